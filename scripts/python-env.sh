#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install Stockade into it, editable.
# Usage: scripts/python-env.sh [EXTRA]   e.g. "test" installs the test tools too.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
"$python" - <<'PY' || { echo "python-env: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if [ ! -x .venv/bin/python ]; then
  echo "python-env: creating .venv" >&2
  "$python" -m venv .venv
fi
target="."
[ -n "$extra" ] && target=".[$extra]"
echo "python-env: installing stockade${extra:+ with [$extra]} into .venv" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import stockade" || { echo "python-env: install failed" >&2; exit 1; }

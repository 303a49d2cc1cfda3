#!/usr/bin/env bash
# Install the peers that bench/relay.py measures Stockade against, each pinned and in its own
# place under .tools/bench/ (git-ignored), so none of them touches the project's own venv:
#   mcp-proxy 0.13.0            .tools/bench/mcp-proxy     (its own venv; it needs the MCP SDK < 2)
#   mcp-contextforge-gateway    .tools/bench/contextforge  (its own venv; `mcpgateway.translate`)
#   supergateway (npm)          .tools/bench/npm           (npm prefix; runs on the system Node)
# Idempotent: each peer has a stamp file naming what was installed, and is skipped when the
# stamp matches. Only the benchmarks use these; the tests never do.
# Run: bash bench/peers.sh   (PYTHON=... picks the interpreter for the venvs; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
root=.tools/bench
mkdir -p "$root"

MCP_PROXY="mcp-proxy==0.13.0 mcp<2"
CONTEXTFORGE="mcp-contextforge-gateway==1.0.7"
SUPERGATEWAY="supergateway@4.0.0"

venv_with() {  # venv_with DIR "PACKAGES..."
  local dir=$1 want=$2 stamp=$1/.installed
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  echo "peers: installing $want into $dir" >&2
  rm -rf "$dir"
  "$python" -m venv "$dir"
  # shellcheck disable=SC2086 # the package list is meant to split
  "$dir/bin/pip" install -q --disable-pip-version-check $want >&2
  echo "$want" >"$stamp"
}

venv_with "$root/mcp-proxy" "$MCP_PROXY"
venv_with "$root/contextforge" "$CONTEXTFORGE"

stamp="$root/npm/.installed"
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$SUPERGATEWAY" ]; }; then
  command -v npm >/dev/null 2>&1 || { echo "peers: npm is required (apt-get install npm)" >&2; exit 1; }
  echo "peers: installing $SUPERGATEWAY into $root/npm" >&2
  mkdir -p "$root/npm"
  npm install --prefix "$root/npm" --no-audit --no-fund --loglevel=error "$SUPERGATEWAY" >&2
  echo "$SUPERGATEWAY" >"$stamp"
fi

"$root/mcp-proxy/bin/mcp-proxy" --help >/dev/null
# ContextForge refuses to import without its secrets set; throwaway ones for the check.
throwaway=$(head -c 48 /dev/urandom | base64 | tr -d '/+=')
JWT_SECRET_KEY=$throwaway AUTH_ENCRYPTION_SECRET=$throwaway BASIC_AUTH_PASSWORD=$throwaway \
  PLATFORM_ADMIN_PASSWORD=$throwaway DEFAULT_USER_PASSWORD=$throwaway \
  "$root/contextforge/bin/python" -m mcpgateway.translate --help >/dev/null 2>&1 ||
  { echo "peers: ContextForge's mcpgateway.translate does not start" >&2; exit 1; }
test -x "$root/npm/node_modules/.bin/supergateway"
echo "peers: ready in $root" >&2

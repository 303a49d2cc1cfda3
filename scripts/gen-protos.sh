#!/usr/bin/env bash
# Regenerate daemon/stockade/v1 from proto/stockade/v1 (or into $1, for the staleness test).
# The generated code is checked in; tests/test_protos.py fails when it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-daemon}"
mkdir -p "$out"
python -m grpc_tools.protoc -Iproto \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  proto/stockade/v1/*.proto

"""Stockade: every MCP server in its own restricted container, relayed, policed and audited."""

import os

# gRPC's C core writes its own lines to stderr, read once when grpc is imported (a refused
# handshake is an INFO line): below ERROR they are left out, so that the daemon's log stays
# one JSON record a line and the CLI's stderr says only what Stockade says. An operator who
# sets GRPC_VERBOSITY keeps theirs.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The one place the version is written (pyproject.toml reads it): no importlib.metadata
# lookup at start-up, which `stockade connect` pays on every session a host opens.
__version__ = "0.1.0"

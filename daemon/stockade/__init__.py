"""Stockade: every MCP server in its own restricted container, relayed, policed and audited."""

# The one place the version is written (pyproject.toml reads it): no importlib.metadata
# lookup at start-up, which `stockade connect` pays on every session a host opens.
__version__ = "0.1.0"

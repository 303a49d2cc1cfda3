"""Stockade: every MCP server in its own restricted container, relayed, policed and audited."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stockade")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

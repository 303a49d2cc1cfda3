"""A small MCP server built on the SDK's own MCPServer, which speaks both protocol eras.

Baked into stockade/python as `stockade-modern-server`: it lets tests and demos exercise the
2026-07-28 protocol (server/discover, per-request _meta protocol version) through Stockade.
"""

from mcp.server.mcpserver import MCPServer

server = MCPServer("stockade-modern")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


if __name__ == "__main__":
    server.run()

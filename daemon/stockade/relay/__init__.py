"""The relay: JSON-RPC framing, sessions, and the two directions between host and server."""

"""The Streamable HTTP front for remote MCP hosts (mTLS, the same relay pipeline)."""

"""Secrets: stored in a vault (local encrypted store or OpenBao/Vault KV v2), delivered to
a sandbox as files on a tmpfs, never through the environment, and redacted on the way out."""

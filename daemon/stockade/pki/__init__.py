"""The daemon's own certificate authority: identities for hosts and operators (mTLS)."""

# The name in the daemon's certificate that clients verify (also on the Unix socket). Kept
# here, free of heavy imports, because `stockade connect` needs it at start-up.
SERVER_NAME = "stockaded"

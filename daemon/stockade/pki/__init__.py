"""The daemon's own certificate authority: identities for hosts and operators (mTLS)."""

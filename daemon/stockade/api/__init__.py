"""gRPC API: servicers and the server factory (listeners, limits, interceptors)."""

"""Supervisor: instances of servers, the warm pool, and reconciling them with the engine."""

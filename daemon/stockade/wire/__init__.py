"""Bytes on the wire: line framing and strict JSON, I/O-free, shared by the bridge and the relay."""

"""Sandboxes: how an MCP server's container is described, built, run and attached.

`docker_backend`, `images`, `locks` and `server_images` are the only modules in Stockade that
import `docker`.
"""

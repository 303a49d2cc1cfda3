"""Sandbox errors, typed so that callers decide on lifecycle without knowing Docker.

Kept apart from the backend so that code which only reports them (the CLI) does not import
the docker SDK.
"""

from __future__ import annotations


class SandboxError(Exception):
    """A sandbox operation failed; the message is safe to show to an operator."""


class EngineUnavailable(SandboxError):
    """The Docker engine does not answer."""


class ContainerGone(SandboxError):
    """The container no longer exists (removed, or never created)."""


class RuntimeMissing(SandboxError):
    """The requested OCI runtime (e.g. runsc) is not registered with the engine."""


class ImageMissing(SandboxError):
    """The image is not present locally (registries are never consulted at run time)."""


# What a container's exit code usually means, for operators reading `server status`.
EXIT_MEANINGS = {
    126: "command found but not executable",
    127: "command not found",
    137: "killed: out of memory, or stopped with SIGKILL",
    139: "crashed: segmentation fault",
    143: "terminated: SIGTERM",
}

"""Helpers for tests that run real containers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.spec import LABEL_DAEMON, LABEL_SERVER, ContainerSpec

PYTHON_IMAGE = "stockade/python:latest"
NODE_IMAGE = "stockade/node:latest"


def hardened_spec(image: str, command: Sequence[str], **fields: object) -> ContainerSpec:
    """A hardened spec labelled so that `cleanup_containers` removes it after the test."""
    labels = {LABEL_DAEMON: "pytest", LABEL_SERVER: "test"}
    return ContainerSpec.model_validate(
        {"image": image, "command": tuple(command), "labels": labels, **fields}
    )


async def run_to_completion(
    backend: DockerBackend, spec: ContainerSpec, timeout: float = 60
) -> tuple[int, list[str], list[str]]:
    """Run `spec` until it exits; return (exit code, stdout lines, stderr lines)."""
    container_id = await asyncio.to_thread(backend.create, spec)
    attachment = await asyncio.to_thread(backend.attach, container_id)
    errors: list[str] = []
    stdio = await AttachedStdio.open(
        attachment, 1 << 20, on_stderr=lambda line: errors.append(line.decode(errors="replace"))
    )
    out: list[str] = []
    try:
        # Keep stdin open: half-closing it would end Docker's output stream (sandbox/attached.py).
        await asyncio.to_thread(backend.start, container_id)

        async def collect() -> None:
            async for line in stdio.lines():
                if isinstance(line, bytes):
                    out.append(line.decode(errors="replace"))

        await asyncio.wait_for(collect(), timeout)
        status = await asyncio.to_thread(backend.wait, container_id, timeout)
    finally:
        await stdio.close()
        await asyncio.to_thread(backend.stop, container_id, 0)
    return status.exit_code, out, errors

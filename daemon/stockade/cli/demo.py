"""`stockade demo`: build the images, run mcp-server-time in a hardened sandbox, list its tools.

Later issues extend this to the whole path through the daemon; for now it proves the
sandbox: a container with every hardened default, spoken to over its attached stdio.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from stockade.config import load_settings
from stockade.probe import list_tools
from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.images import ImageBuilder
from stockade.sandbox.spec import LABEL_SERVER, ContainerSpec

DEMO_IMAGE = "stockade/python:latest"
DEMO_COMMAND = ("mcp-server-time", "--local-timezone", "UTC")


def _say(text: str) -> None:
    print(text, flush=True)


async def _talk(
    backend: DockerBackend, spec: ContainerSpec, max_line: int
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    container_id = await asyncio.to_thread(backend.create, spec)
    try:
        attachment = await asyncio.to_thread(backend.attach, container_id)
        stdio = await AttachedStdio.open(attachment, max_line, on_stderr=lambda _line: None)
        try:
            await asyncio.to_thread(backend.start, container_id)
            info, tools = await list_tools(stdio)
        finally:
            await stdio.close_stdin()
            await stdio.close()
    finally:
        await asyncio.to_thread(backend.stop, container_id, 2.0)
    return info, tools, container_id


def run_demo(ca_bundle: Path | None) -> int:
    settings = load_settings()
    backend = DockerBackend()
    started = time.monotonic()
    _say("1/3 building sandbox images (skipped when up to date)")
    builder = ImageBuilder(backend.client, ca_bundle=ca_bundle, progress=lambda s: _say(f"    {s}"))
    builder.ensure(["python"])
    _say("2/3 starting mcp-server-time in a hardened container")
    _say("    read-only root, no capabilities, no-new-privileges, uid 10001, no network,")
    _say(
        f"    {settings.container_memory_bytes // 2**20} MiB, {settings.container_cpus:g} CPU, "
        f"{settings.container_pids_limit} pids, noexec /tmp"
    )
    spec = ContainerSpec.from_settings(
        settings, image=DEMO_IMAGE, command=DEMO_COMMAND, labels={LABEL_SERVER: "demo-time"}
    )
    info, tools, container_id = asyncio.run(_talk(backend, spec, settings.max_message_bytes))
    _say(
        f"3/3 {info.get('name', '?')} {info.get('version', '')} answered over the container's stdio"
    )
    _say(f"    container {container_id[:12]} (removed); tools:")
    for tool in tools:
        first_line = str(tool.get("description", "")).strip().splitlines()[:1]
        _say(f"    - {tool['name']}: {first_line[0] if first_line else ''}")
    _say(f"done in {time.monotonic() - started:.1f}s")
    return 0 if tools else 1


if __name__ == "__main__":
    sys.exit(run_demo(None))

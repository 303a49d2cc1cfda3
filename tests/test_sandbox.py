"""Real containers on the real engine: the hardened defaults hold and MCP servers answer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stockade.probe import list_tools
from stockade.sandbox.attached import AttachedStdio
from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.images import ImageBuilder
from stockade.sandbox.spec import LABEL_MANAGED, ContainerSpec
from tests.sandboxes import NODE_IMAGE, PYTHON_IMAGE, hardened_spec, run_to_completion

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images", "cleanup_containers")]

MiB = 1024 * 1024


async def tools_of(
    backend: DockerBackend, spec: ContainerSpec
) -> tuple[dict[str, Any], list[str], str]:
    container_id = await asyncio.to_thread(backend.create, spec)
    attachment = await asyncio.to_thread(backend.attach, container_id)
    stdio = await AttachedStdio.open(attachment, 4 * MiB, on_stderr=lambda _line: None)
    try:
        await asyncio.to_thread(backend.start, container_id)
        info, tools = await list_tools(stdio, timeout=60)
    finally:
        await stdio.close()
    return info, [tool["name"] for tool in tools], container_id


def test_time_server_answers_initialize_and_tools_list(backend: DockerBackend) -> None:
    spec = hardened_spec(PYTHON_IMAGE, ["mcp-server-time", "--local-timezone", "UTC"])
    info, names, _ = asyncio.run(tools_of(backend, spec))
    assert info["name"] == "mcp-time"
    assert sorted(names) == ["convert_time", "get_current_time"]


def test_everything_server_answers_tools_list(backend: DockerBackend) -> None:
    spec = hardened_spec(NODE_IMAGE, ["mcp-server-everything"])
    info, names, _ = asyncio.run(tools_of(backend, spec))
    assert "everything" in info["name"]
    assert {"echo", "get-sum"} <= set(names)


def test_docker_inspect_shows_every_hardened_default(backend: DockerBackend) -> None:
    spec = hardened_spec(
        PYTHON_IMAGE,
        ["mcp-server-time"],
        memory_bytes=128 * MiB,
        cpus=0.5,
        pids_limit=32,
        tmpfs_bytes=16 * MiB,
    )
    _, names, container_id = asyncio.run(tools_of(backend, spec))
    assert names  # inspected while it serves, not a container that never ran
    details = backend.inspect(container_id)
    host = details["HostConfig"]
    assert details["State"]["Running"] is True
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["Privileged"] is False
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any("seccomp=unconfined" in opt for opt in host["SecurityOpt"])
    assert not any("apparmor=unconfined" in opt for opt in host["SecurityOpt"])
    assert details["Config"]["User"] == "10001:10001"
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == 128 * MiB
    assert host["MemorySwap"] == 128 * MiB
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 32
    tmp_options = host["Tmpfs"]["/tmp"].split(",")
    assert {"noexec", "nosuid", "nodev", f"size={16 * MiB}"} <= set(tmp_options)
    assert host["Runtime"] == "runc"
    assert host["IpcMode"] == "private"
    # the engine's copy of its output is capped: a flooding server cannot fill its disk
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}}
    assert not host["Binds"]
    assert details["Config"]["Labels"][LABEL_MANAGED] == "true"
    assert details["Config"]["Tty"] is False
    assert details["Config"]["OpenStdin"] is True


def test_inside_the_sandbox_privileges_are_gone(backend: DockerBackend) -> None:
    script = "; ".join(
        [
            "id -u",
            "grep -E '^(CapEff|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status",
            "(echo x > /probe) 2>/dev/null && echo root-writable || echo root-readonly",
            "(echo x > /tmp/probe) 2>/dev/null && echo tmp-writable || echo tmp-readonly",
            "cp /bin/true /tmp/t && (/tmp/t && echo tmp-exec || echo tmp-noexec)",
            "echo interfaces=$(grep -cv -E '^ *(lo|Inter|face)' /proc/net/dev)",
        ]
    )
    code, out, errors = asyncio.run(
        run_to_completion(backend, hardened_spec(PYTHON_IMAGE, ["/bin/sh", "-c", script]))
    )
    assert code == 0, errors
    fields = dict(line.split(":\t", 1) for line in out if ":\t" in line)
    assert out[0] == "10001"
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # filter mode: Docker's default profile
    assert "root-readonly" in out
    assert "tmp-writable" in out
    assert "tmp-noexec" in out, (out, errors)
    assert out[-1] == "interfaces=0", "the container has a network interface besides lo"


def test_image_builds_are_skipped_when_recipes_are_unchanged(
    backend: DockerBackend, images: ImageBuilder
) -> None:
    again = ImageBuilder(backend.client, progress=lambda _line: None).ensure(["python", "node"])
    assert [(r.name, r.built) for r in again] == [
        ("base", False),
        ("python", False),
        ("node", False),
    ]
    for result in again:
        labels = backend.client.api.inspect_image(result.tag)["Config"]["Labels"]
        assert labels["io.stockade.recipe-hash"] == result.recipe_hash


@pytest.mark.parametrize("image", [PYTHON_IMAGE, NODE_IMAGE])
def test_build_time_ca_never_reaches_the_final_image(backend: DockerBackend, image: str) -> None:
    history = backend.client.api.history(image)
    assert not any("build-ca" in str(layer.get("CreatedBy", "")) for layer in history)
    script = "ls /build /opt/mcp/build-ca.pem 2>/dev/null | wc -l"
    code, out, _ = asyncio.run(
        run_to_completion(backend, hardened_spec(image, ["/bin/sh", "-c", script]))
    )
    assert code == 0
    assert out == ["0"]

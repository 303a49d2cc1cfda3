"""`server add --image REF` pulls an absent image from a registry and pins its digest.

The registry is Debian's `docker-registry` (the reference distribution registry), started by
this test on a loopback port with its storage in a temporary folder; scripts/test.sh
installs it. The engine trusts 127.0.0.0/8 registries over plain HTTP by default.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from stockade.sandbox.images import ImageBuilder
from tests.daemon_helper import running_daemon

pytestmark = [pytest.mark.docker]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """host:port of a fresh local registry."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed: run the tests with scripts/test.sh")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'store'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    process = subprocess.Popen([binary, "serve", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("the local registry did not start")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_an_absent_image_is_pulled_pinned_and_run_as_10001(
    tmp_path: Path, images: ImageBuilder, registry: str
) -> None:
    client = docker.from_env()
    ref = f"{registry}/stockade-test/rooted:17"
    client.images.build(
        fileobj=io.BytesIO(b"FROM stockade/python:latest\nUSER root\n"), tag=ref, rm=True
    )
    client.images.push(ref)
    client.images.remove(ref)  # absent now: the add must pull it
    with running_daemon(tmp_path / "daemon") as daemon:
        try:
            out = daemon.cli(
                "server", "add", "remote", "--image", ref, "--warm", "0", "--", "mcp-server-time"
            ).stdout
            assert f"pulling {ref}" in out
            assert "the image's own USER is root; Stockade runs it as uid 10001" in out
            shown = json.loads(daemon.cli("server", "show", "remote", "--json").stdout)
            digest = shown["server"]["source"]["digest"]
            assert digest.startswith(f"{registry}/stockade-test/rooted@sha256:")
            assert digest in client.images.get(ref).attrs["RepoDigests"]
            assert f"image {ref} ({digest})" in daemon.cli("server", "show", "remote").stdout
            # upgrade to another tag: pulled, pinned anew, and the pool follows the trial
            newer = f"{registry}/stockade-test/rooted:18"
            client.images.build(
                fileobj=io.BytesIO(b"FROM stockade/python:latest\nUSER root\nENV V=18\n"),
                tag=newer,
                rm=True,
            )
            client.images.push(newer)
            client.images.remove(newer)
            upgraded = daemon.cli("server", "upgrade", "remote", "--to", newer).stdout
            assert f"pulling {newer}" in upgraded
            after = json.loads(daemon.cli("server", "show", "remote", "--json").stdout)
            assert after["server"]["image"] == newer
            assert after["server"]["source"]["digest"].startswith(
                f"{registry}/stockade-test/rooted@sha256:"
            )
            assert after["server"]["source"]["digest"] != digest
            assert after["server"]["image_id"] != shown["server"]["image_id"]
        finally:
            for tag in (ref, f"{registry}/stockade-test/rooted:18"):
                with contextlib.suppress(docker.errors.ImageNotFound):
                    client.images.remove(tag, force=True)

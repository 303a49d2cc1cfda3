"""Run any MCP server (issue 17): real packages from PyPI and npm, and foreign images.

Each package is pinned, so the per-server image is built once and a second run finds it
by recipe (the build output says "cached"). Builds reach PyPI and npm only through the
host's CA bundle, as `stockade image build` does.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client, StdioServerParameters

from stockade.sandbox.images import ImageBuilder
from tests.conftest import ca_bundle
from tests.daemon_helper import ALLOW_ALL_POLICY, BIN, Daemon, HostSession, running_daemon
from tests.daemon_helper import INIT_PARAMS as INIT

pytestmark = [pytest.mark.docker]

FETCH = "mcp-server-fetch==2026.10.24"
GIT = "mcp-server-git==2026.10.19"
MEMORY = "@modelcontextprotocol/server-memory@2026.8.31"
THINKING = "@modelcontextprotocol/server-sequential-thinking@2026.8.31"


def build_args() -> list[str]:
    bundle = ca_bundle()
    return ["--ca-bundle", str(bundle)] if bundle else []


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with one commit, owned by the sandbox's uid (git checks owners)."""
    folder = tmp_path_factory.mktemp("repo")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    (folder / "README").write_text("hello\n")
    for command in (["init", "-q", "-b", "main"], ["add", "README"], ["commit", "-qm", "first"]):
        subprocess.run(["git", "-C", str(folder), *command], check=True, env=env)
    for path in [folder, *folder.rglob("*")]:
        os.lchown(path, 10001, 10001)
    return folder


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, images: ImageBuilder, repo: Path
) -> Iterator[Daemon]:
    policy = (
        ALLOW_ALL_POLICY
        + f"sandboxes:\n  git:\n    mounts:\n      - {{source: {repo}, target: /repo}}\n"
    )
    with running_daemon(tmp_path_factory.mktemp("sources"), policy=policy) as running:
        running.issue_host("sources-host")
        yield running


def add(daemon: Daemon, name: str, *arguments: str) -> str:
    result = daemon.cli("server", "add", name, "--warm", "0", *arguments)
    return result.stdout


def test_mcp_server_fetch_from_pypi_answers_the_sdk_client(daemon: Daemon) -> None:
    out = add(daemon, "fetch", "--pypi", FETCH, *build_args())
    assert "answered: mcp-fetch" in out
    assert "1 tools" in out
    again = daemon.cli("server", "add", "fetch", "--replace", "--pypi", FETCH, *build_args())
    assert "cached (mcp-server-fetch 2026.10.24)" in again.stdout  # the build was skipped
    shown = json.loads(daemon.cli("server", "inspect", "fetch", "--json").stdout)
    assert shown["source"]["kind"] == "pypi"
    assert shown["source"]["version"] == "2026.10.24"
    assert len(shown["source"]["lock_hash"]) == 64
    assert shown["image"].startswith("stockade/srv/")
    params = StdioServerParameters(
        command=str(BIN / "stockade"),
        args=daemon.bridge("fetch", daemon.hosts["sources-host"])[1:],
    )

    async def scenario() -> list[str]:
        async with Client(params) as client:
            return [t.name for t in (await client.list_tools()).tools]

    assert anyio.run(scenario) == ["fetch"]


def test_mcp_server_git_reads_a_repository_mounted_read_only(daemon: Daemon) -> None:
    out = add(
        daemon, "git", "--pypi", GIT, "--apt", "git", *build_args(), "--", "--repository", "/repo"
    )
    assert "answered: mcp-git" in out

    async def scenario() -> dict[str, Any]:
        async with HostSession(daemon, "git") as host:
            await host.request("initialize", INIT)
            return await host.request(
                "tools/call", {"name": "git_log", "arguments": {"repo_path": "/repo"}}
            )

    answer = asyncio.run(scenario())
    text = answer["result"]["content"][0]["text"]
    assert "first" in text, answer


@pytest.mark.parametrize(
    ("name", "package", "answered"),
    [
        ("memory", MEMORY, "answered: memory-server"),
        ("thinking", THINKING, "answered: sequential-thinking-server"),
    ],
)
def test_npm_servers(daemon: Daemon, name: str, package: str, answered: str) -> None:
    out = add(daemon, name, "--npm", package, *build_args())
    assert answered in out, out

    async def scenario() -> list[str]:
        async with HostSession(daemon, name) as host:
            await host.request("initialize", INIT)
            listed = await host.request("tools/list")
            return [t["name"] for t in listed["result"]["tools"]]

    tools = asyncio.run(scenario())
    assert tools, tools


def refused(daemon: Daemon, name: str, *arguments: str) -> str:
    result = daemon.cli("server", "add", name, *arguments, check=False)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    listed = json.loads(daemon.cli("server", "ls", "--json").stdout)
    assert name not in [s["name"] for s in listed]
    mine = [c for c in daemon.containers() if c["Labels"].get("io.stockade.server") == name]
    assert mine == []  # (other tests' sessions may still be stopping)
    leftovers = docker.from_env().containers.list(
        all=True, filters={"label": "io.stockade.role=lock"}
    )
    assert leftovers == []
    return lines[0]


def test_a_package_that_does_not_exist_is_refused(daemon: Daemon) -> None:
    line = refused(daemon, "nopkg", "--pypi", "stockade-no-such-package-17==1.0", *build_args())
    assert "resolving stockade-no-such-package-17==1.0 on PyPI failed" in line
    line = refused(
        daemon, "nonpm", "--npm", "@stockade-none/no-such-package-17@1.0.0", *build_args()
    )
    assert "on npm failed" in line


def test_an_unknown_entrypoint_is_refused(daemon: Daemon) -> None:
    line = refused(daemon, "badentry", "--npm", MEMORY, "--entrypoint", "nope", *build_args())
    assert "has no entry point 'nope'" in line


def test_an_image_that_cannot_be_pulled_is_refused(daemon: Daemon) -> None:
    line = refused(daemon, "nopull", "--image", "localhost:1/nothing:1", "--", "x")
    assert "is not present and could not be pulled" in line


def test_a_root_user_image_runs_as_10001(daemon: Daemon) -> None:
    client = docker.from_env()
    client.images.build(
        fileobj=io.BytesIO(b"FROM stockade/python:latest\nUSER root\n"),
        tag="stockade-test/root-user:17",
        rm=True,
    )
    out = daemon.cli(
        "server",
        "add",
        "rooted",
        "--image",
        "stockade-test/root-user:17",
        "--warm",
        "1",
        "--",
        "mcp-server-time",
    ).stdout
    assert "the image's own USER is root; Stockade runs it as uid 10001" in out
    try:
        deadline = 60
        while deadline and not daemon.containers():
            time.sleep(0.5)
            deadline -= 1
        container = client.containers.get(daemon.containers()[0]["Id"])
        assert container.attrs["Config"]["User"] == "10001:10001"
        assert container.exec_run(["id", "-u"]).output.strip() == b"10001"
    finally:
        daemon.cli("server", "rm", "rooted")


def show(daemon: Daemon, name: str) -> dict[str, Any]:
    details: dict[str, Any] = json.loads(daemon.cli("server", "show", name, "--json").stdout)
    return details


def test_server_show_prints_source_pin_sandbox_and_secrets(daemon: Daemon) -> None:
    add(daemon, "shown", "--pypi", FETCH, *build_args())
    text = daemon.cli("server", "show", "shown").stdout
    assert "source:   pypi mcp-server-fetch 2026.10.24 (lock sha256:" in text
    assert "pinned to sha256:" in text
    assert "answered: mcp-fetch" in text
    assert "network none, read-only root" in text
    assert "secrets:  none" in text
    details = show(daemon, "shown")
    assert details["sandbox"]["user"] == "10001:10001"
    daemon.cli("server", "rm", "shown")


def test_upgrade_swaps_only_when_the_trial_answers(daemon: Daemon) -> None:
    older = MEMORY.replace("2026.8.31", "2026.7.4")
    add(daemon, "upgraded", "--npm", older, *build_args())
    before = show(daemon, "upgraded")["server"]
    assert before["source"]["version"] == "2026.7.4"
    bad = daemon.cli(
        "server", "upgrade", "upgraded", "--to", "9999.0.0", *build_args(), check=False
    )
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1
    assert show(daemon, "upgraded")["server"] == before  # nothing changed
    daemon.cli("server", "upgrade", "upgraded", "--to", "2026.8.31", *build_args())
    after = show(daemon, "upgraded")["server"]
    assert after["source"]["version"] == "2026.8.31"
    assert after["image_id"] != before["image_id"]
    daemon.cli("server", "rm", "upgraded")


def test_a_version_pin_survives_a_daemon_restart(tmp_path: Path, images: ImageBuilder) -> None:
    with running_daemon(tmp_path) as first:
        add(first, "memory", "--npm", MEMORY, *build_args())
        before = first.cli("server", "show", "memory").stdout
    with running_daemon(tmp_path) as second:
        after = second.cli("server", "show", "memory").stdout
    assert "npm @modelcontextprotocol/server-memory 2026.8.31" in after
    assert after == before


SERVER_JSON = {
    "$schema": "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json",
    "name": "io.github.modelcontextprotocol/server-memory",
    "version": "2026.8.31",
    "packages": [
        {
            "registryType": "npm",
            "identifier": "@modelcontextprotocol/server-memory",
            "version": "2026.8.31",
            "transport": {"type": "stdio"},
            "environmentVariables": [
                {"name": "MEMORY_FILE_PATH", "default": "/tmp/memory.json"},
                {"name": "MEMORY_TOKEN", "isSecret": True, "isRequired": True},
            ],
        }
    ],
}
PINS = re.compile(r"image: (?P<image>\S+), command: (?P<command>\[.*\]), secrets:")


def test_a_server_json_with_a_secret_starts_only_once_the_secret_is_set(
    tmp_path: Path, images: ImageBuilder
) -> None:
    entry = tmp_path / "server.json"
    entry.write_text(json.dumps(SERVER_JSON))
    token = "tok-" + os.urandom(8).hex()
    with running_daemon(tmp_path / "daemon") as daemon:
        arguments = ("--from", str(entry), "--warm", "1", *build_args())
        line = refused(daemon, "mem", *arguments)
        assert "needs the secret(s) mem.MEMORY_TOKEN" in line
        assert "stockade secret set" in line
        skipped = refused(daemon, "mem", *arguments, "--no-check")  # no trial: still refused
        assert "needs the secret(s) mem.MEMORY_TOKEN" in skipped
        subprocess.run(
            [str(BIN / "stockade"), "secret", "set", "mem.MEMORY_TOKEN"],
            input=token.encode(),
            env=daemon.env,
            check=True,
            capture_output=True,
        )
        # Not granted yet: the refusal names the exact pins a grant needs (a sandbox granted
        # secrets must pin the image by digest and the command), and the operator writes them.
        ungranted = refused(daemon, "mem", *arguments)
        pins = PINS.search(ungranted)
        assert pins is not None, ungranted
        grant = (
            f"sandboxes:\n  mem:\n    image: {pins['image']}\n"
            f"    command: {pins['command']}\n    secrets: [mem.MEMORY_TOKEN]\n"
        )
        daemon.write_policy(ALLOW_ALL_POLICY + grant)
        deadline = time.monotonic() + 30
        while '"policy loaded"' not in daemon.log_path.read_text().split("secret set")[-1]:
            assert time.monotonic() < deadline, "the policy was not reloaded"
            time.sleep(0.5)
        out = daemon.cli("server", "add", "mem", *arguments).stdout
        assert "answered: memory-server" in out
        shown = daemon.cli("server", "show", "mem").stdout
        assert "MEMORY_FILE_PATH=/tmp/memory.json" in shown
        assert "MEMORY_TOKEN <- mem.MEMORY_TOKEN" in shown
        assert token not in shown
        deadline = time.monotonic() + 60
        while not daemon.containers() and time.monotonic() < deadline:
            time.sleep(0.5)
        container = docker.from_env().containers.get(daemon.containers()[0]["Id"])
        # The server process (tini's child, exec'd by the shim) has both variables ...
        seen = container.exec_run(
            ["sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"]
        ).output.decode()
        assert f"MEMORY_TOKEN={token}" in seen
        assert "MEMORY_FILE_PATH=/tmp/memory.json" in seen
        # ... but the container's configuration holds only the plain one.
        assert token not in json.dumps(container.attrs)


def test_the_index_and_registry_given_are_the_ones_asked(daemon: Daemon) -> None:
    # Nothing listens on port 9: a package that exists on PyPI and npm is then not found,
    # which shows the resolver asked only the index the operator named.
    line = refused(daemon, "idx", "--pypi", FETCH, "--index-url", "http://127.0.0.1:9/simple")
    assert "No matching distribution found for mcp-server-fetch==2026.10.24" in line
    line = refused(daemon, "reg", "--npm", MEMORY, "--registry", "http://127.0.0.1:9/")
    assert "ECONNREFUSED" in line


def test_an_sdist_only_package_is_refused_unless_source_builds_are_allowed(
    daemon: Daemon,
) -> None:
    # docopt 0.6.2 exists only as an sdist: building it would run its setup.py.
    line = refused(daemon, "sdist", "--pypi", "docopt==0.6.2", *build_args())
    assert "wheels only: --allow-source-builds" in line


def test_a_resolver_the_engine_cannot_start_leaves_no_container(images: ImageBuilder) -> None:
    """A lock resolver whose start the engine refuses (here: no such program in the image;
    the same path as a network the engine cannot attach) is a LockError, and its created
    container is removed, not left behind."""
    from stockade.sandbox.locks import LockError, _run

    client = docker.from_env()
    with pytest.raises(LockError, match="resolving nothing"):
        _run(
            client,
            "stockade/pybuild:latest",
            ["/no/such/resolver"],
            environment={},
            ca_bundle=None,
            what="resolving nothing",
        )
    leftovers = client.containers.list(all=True, filters={"label": "io.stockade.role=lock"})
    assert leftovers == []

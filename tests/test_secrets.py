"""Secrets: the local encrypted store, OpenBao (a real `bao server -dev`), delivery as
tmpfs files, redaction on the way out, and no trace of a value anywhere else."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets as random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from stockade.sandbox.spec import LABEL_SERVER
from stockade.secrets.local import LocalSecretStore, load_master_key
from stockade.secrets.model import (
    SecretError,
    SecretExists,
    SecretNotFound,
    SecretStoreDamaged,
    SecretStoreLocked,
)
from stockade.secrets.redact import Redactor
from stockade.secrets.vault import VaultSecretStore
from tests.daemon_helper import INIT_PARAMS as INIT
from tests.daemon_helper import Daemon, HostSession, free_port, running_daemon

BIN = Path(sys.executable).parent


def new_value() -> bytes:
    return f"sk-test-{random.token_hex(16)}".encode()


# -- the local store ----------------------------------------------------------------------


def test_local_store_round_trip_keeps_no_plaintext(tmp_path: Path) -> None:
    key = load_master_key(tmp_path / "master.key")
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    store = LocalSecretStore(tmp_path / "secrets.json", key)
    first, second = new_value(), new_value()
    created = store.set("api-token", first, rotate=False)
    assert (created.version, created.backend) == (1, "local")
    with pytest.raises(SecretExists):
        store.set("api-token", second, rotate=False)
    rotated = store.set("api-token", second, rotate=True)
    assert rotated.version == 2 and rotated.created == created.created
    reopened = LocalSecretStore(tmp_path / "secrets.json", key)
    assert reopened.get("api-token") == second
    assert [i.name for i in reopened.list()] == ["api-token"]
    text = (tmp_path / "secrets.json").read_bytes()
    assert first not in text and second not in text
    reopened.remove("api-token")
    with pytest.raises(SecretNotFound):
        reopened.get("api-token")
    with pytest.raises(SecretNotFound):
        reopened.set("nope", first, rotate=True)


def test_a_wrong_master_key_fails_clearly_and_changes_nothing(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path / "secrets.json", load_master_key(tmp_path / "a.key"))
    store.set("api-token", new_value(), rotate=False)
    before = (tmp_path / "secrets.json").read_bytes()
    with pytest.raises(SecretStoreLocked, match="the master key does not open") as raised:
        LocalSecretStore(tmp_path / "secrets.json", load_master_key(tmp_path / "b.key"))
    assert "\n" not in str(raised.value)
    assert (tmp_path / "secrets.json").read_bytes() == before


def test_a_truncated_or_edited_store_is_refused_whole(tmp_path: Path) -> None:
    key = load_master_key(tmp_path / "master.key")
    store = LocalSecretStore(tmp_path / "secrets.json", key)
    store.set("one", new_value(), rotate=False)
    store.set("two", new_value(), rotate=False)
    whole = (tmp_path / "secrets.json").read_bytes()
    (tmp_path / "secrets.json").write_bytes(whole[: len(whole) // 2])  # cut mid-write
    with pytest.raises(SecretStoreDamaged, match="damaged or truncated"):
        LocalSecretStore(tmp_path / "secrets.json", key)
    document = json.loads(whole)
    del document["secrets"]["two"]  # a rollback / removal behind the daemon's back
    (tmp_path / "secrets.json").write_text(json.dumps(document))
    with pytest.raises(SecretStoreDamaged, match="altered"):
        LocalSecretStore(tmp_path / "secrets.json", key)


def test_a_readable_key_file_is_refused(tmp_path: Path) -> None:
    load_master_key(tmp_path / "master.key")
    os.chmod(tmp_path / "master.key", 0o644)
    with pytest.raises(SecretStoreLocked, match="chmod 600"):
        load_master_key(tmp_path / "master.key")


def test_the_daemon_stops_with_one_line_on_a_wrong_master_key(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, extra_env={"STOCKADE_SECRETS_KEY_FILE": str(tmp_path / "right.key")})
    daemon.start()  # the store is made with the right key, and the trail knows it
    assert daemon.stop() == 0
    state = daemon.state_dir
    store = LocalSecretStore(state / "secrets.json", load_master_key(tmp_path / "right.key"))
    store.set("x", new_value(), rotate=False)
    load_master_key(tmp_path / "wrong.key")
    env = {**daemon.env, "STOCKADE_SECRETS_KEY_FILE": str(tmp_path / "wrong.key")}
    run = subprocess.run(
        [str(BIN / "stockaded")], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 78
    last = json.loads((run.stdout + run.stderr).strip().splitlines()[-1])
    assert last["event"] == "cannot open the secret store"
    assert "the master key does not open" in last["error"]


def test_redaction_finds_raw_and_json_escaped_values() -> None:
    redactor = Redactor({"a": b'p"w\\d', "b": b"plain-value"})
    out, found = redactor.apply(b'{"text":"x p\\"w\\\\d y plain-value"}')
    assert out == b'{"text":"x [REDACTED:a] y [REDACTED:b]"}'
    assert sorted(found) == ["a", "b"]


# -- OpenBao ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real OpenBao dev server on loopback: (address, token file)."""
    bao = shutil.which("bao") or str(BIN / "bao")
    token = random.token_hex(16)
    port = free_port()
    folder = tmp_path_factory.mktemp("bao")
    token_file = folder / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    process = subprocess.Popen(
        [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(folder)},
    )
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise AssertionError("bao server -dev did not start") from None
            time.sleep(0.2)
    time.sleep(1)  # the dev server mounts secret/ (KV v2) just after it listens
    try:
        yield address, token_file
    finally:
        process.terminate()
        process.wait(10)


def test_openbao_backend_round_trip(openbao: tuple[str, Path]) -> None:
    address, token_file = openbao
    store = VaultSecretStore(address, token_file=token_file, prefix="unit")
    first, second = new_value(), new_value()
    assert store.set("db-password", first, rotate=False).version == 1
    with pytest.raises(SecretExists):
        store.set("db-password", first, rotate=False)
    assert store.get("db-password") == first
    info = store.set("db-password", second, rotate=True)
    assert (info.version, info.backend) == (2, "vault")
    assert store.get("db-password") == second
    assert [i.name for i in store.list()] == ["db-password"]
    store.remove("db-password")
    with pytest.raises(SecretNotFound):
        store.get("db-password")
    assert store.list() == []


@pytest.mark.parametrize("store_kind", ["local", "vault"])
def test_a_trailing_line_ending_is_stripped_where_values_enter_the_store(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    store: LocalSecretStore | VaultSecretStore
    if store_kind == "vault":
        address, token_file = request.getfixturevalue("openbao")
        store = VaultSecretStore(address, token_file=token_file, prefix=random.token_hex(4))
    else:
        store = LocalSecretStore(tmp_path / "secrets.json", load_master_key(tmp_path / "k"))
    value = new_value()
    created = store.set("crlf", value + b"\r\n", rotate=False)
    assert created.line_ending_stripped and store.get("crlf") == value
    rotated = store.set("crlf", value + b"\n\n", rotate=True)
    assert rotated.line_ending_stripped and store.get("crlf") == value
    kept = store.set("crlf", b"in\nside", rotate=True)  # only a trailing run goes
    assert not kept.line_ending_stripped and store.get("crlf") == b"in\nside"
    with pytest.raises(SecretError, match="empty"):
        store.set("blank", b"\r\n", rotate=False)


def test_openbao_refuses_plain_http_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="use https"):
        VaultSecretStore("http://vault.example:8200", token_file=tmp_path / "t")


# -- delivery, end to end -----------------------------------------------------------------

SECRET_POLICY = """\
version: 1
rules:
  - name: echo-with-arguments-on-record
    effect: allow
    identities: ["*"]
    servers: ["everything"]
    methods: ["tools/call"]
    names: ["echo"]
    audit_arguments: true
  - name: everything-else
    effect: allow
    identities: ["*"]
    servers: ["*"]
    methods: ["*"]
sandboxes:
  everything:
    image: stockade/node@{digest}
    command: [mcp-server-everything]
    secrets: [api-token]
"""


def secret_policy() -> str:
    """SECRET_POLICY with the digest of the image built here: secrets need a digest pin."""
    digest = docker.from_env().images.get("stockade/node:latest").id
    return SECRET_POLICY.replace("{digest}", digest)


def _secret_cli(
    daemon: Daemon, *args: str, value: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "stockade"), "secret", *args],
        input=value,
        env=daemon.env,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _containers(server: str) -> list[Any]:
    return docker.from_env().containers.list(filters={"label": f"{LABEL_SERVER}={server}"})


async def _echo(daemon: Daemon, message: str) -> tuple[dict[str, Any], str, str]:
    """Echo `message` through server-everything; also read the secret file from inside."""
    async with HostSession(daemon, "everything") as host:
        await host.request("initialize", INIT)
        answer = await host.request(
            "tools/call", {"name": "echo", "arguments": {"message": message}}
        )
        assert host.opened is not None
        container = next(
            c
            for c in _containers("everything")
            if c.labels.get("io.stockade.instance") == host.opened.instance
        )
        inside = container.exec_run(["cat", "/run/secrets/api-token"], user="10001:10001")
        shim = container.exec_run(
            [
                "stockade-secret-env",
                "TOKEN=api-token",
                "--",
                "sh",
                "-c",
                'printf %s "$TOKEN" | wc -c',
            ],
            user="10001:10001",
        )
        inspect = json.dumps(docker.from_env().api.inspect_container(container.id))
        return answer, inside.output.decode(), shim.output.decode().strip() + "|" + inspect


@pytest.mark.docker
@pytest.mark.usefixtures("images")
@pytest.mark.parametrize("store", ["local", "vault"])
def test_a_granted_secret_reaches_its_server_only_and_nowhere_else(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {}
    if store == "vault":
        address, token_file = request.getfixturevalue("openbao")
        env = {
            "STOCKADE_SECRETS_BACKEND": "vault",
            "STOCKADE_VAULT_ADDRESS": address,
            "STOCKADE_VAULT_TOKEN_FILE": str(token_file),
            "STOCKADE_VAULT_PREFIX": f"e2e-{random.token_hex(4)}",
        }
    value = new_value()
    with running_daemon(tmp_path, policy=secret_policy(), **env) as daemon:
        stored = _secret_cli(daemon, "set", "api-token", value=value + b"\n")
        assert stored.returncode == 0, stored.stderr
        assert b"removed a trailing line ending" in stored.stderr  # and the CLI says so
        daemon.add_server("everything", "stockade/node:latest", "mcp-server-everything", warm=0)
        daemon.add_server("time", "stockade/python:latest", "mcp-server-time", warm=1)

        answer, inside, rest = asyncio.run(_echo(daemon, f"the token is {value.decode()}"))
        shim_length, inspect = rest.split("|", 1)
        assert inside == value.decode()  # granted: readable at /run/secrets/api-token
        assert shim_length == str(len(value))  # and the env shim hands it to the server
        text = answer["result"]["content"][0]["text"]
        assert "[REDACTED:api-token]" in text and value.decode() not in text

        time_container = _containers("time")[0]
        denied = time_container.exec_run(["cat", "/run/secrets/api-token"], user="10001:10001")
        assert denied.exit_code != 0  # not granted: nothing there

        rotated = new_value()
        assert _secret_cli(daemon, "rotate", "api-token", value=rotated).returncode == 0
        _, inside_after, _ = asyncio.run(_echo(daemon, "hello"))
        assert inside_after == rotated.decode()  # new instances get the new value

        listed = _secret_cli(daemon, "ls", "--json")
        assert json.loads(listed.stdout)[0]["version"] == 2
        assert value not in listed.stdout and rotated not in listed.stdout

        everywhere = [inspect.encode(), daemon.log_path.read_bytes(), listed.stdout]
        everywhere += [p.read_bytes() for p in (daemon.state_dir / "audit").glob("*.jsonl")]
        for blob in everywhere:
            assert value not in blob and rotated not in blob
        audit = b"".join(p.read_bytes() for p in (daemon.state_dir / "audit").glob("*.jsonl"))
        assert b'"type":"secret.redacted"' in audit
        assert b'"arguments":{"message":"the token is [REDACTED:api-token]"}' in audit

        removed = _secret_cli(daemon, "rm", "api-token")
        assert removed.returncode == 0
        assert _secret_cli(daemon, "rm", "api-token").returncode == 2


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_an_admin_cannot_read_a_secret_back_by_changing_what_its_server_runs(
    tmp_path: Path,
) -> None:
    value = new_value()
    with running_daemon(tmp_path, policy=secret_policy()) as daemon:
        assert _secret_cli(daemon, "set", "api-token", value=value).returncode == 0
        daemon.add_server("everything", "stockade/node:latest", "mcp-server-everything", warm=0)
        exfiltrate = ["sh", "-c", "base64 /run/secrets/api-token >&2; sleep 30"]
        replaced = daemon.cli(
            "server",
            "add",
            "everything",
            "--replace",
            "--image",
            "stockade/node:latest",
            "--",
            *exfiltrate,
            check=False,
        )
        assert replaced.returncode != 0
        assert "pins the command" in replaced.stderr
        other_image = daemon.cli(
            "server",
            "add",
            "everything",
            "--replace",
            "--image",
            "stockade/python:latest",
            "--",
            "mcp-server-everything",
            check=False,
        )
        assert other_image.returncode != 0 and "allows only" in other_image.stderr
        elsewhere = daemon.cli(  # the same argv run elsewhere could be other code
            "server",
            "add",
            "everything",
            "--replace",
            "--image",
            "stockade/node:latest",
            "--workdir",
            "/tmp",
            "--",
            "mcp-server-everything",
            check=False,
        )
        assert elsewhere.returncode != 0 and "working directory" in elsewhere.stderr
        # The registration is unchanged, and nothing it ran printed the value in any form.
        shown = json.loads(daemon.cli("server", "inspect", "everything", "--json").stdout)
        assert shown["command"] == ["mcp-server-everything"]
        logs = daemon.cli("server", "logs", "everything").stdout
        assert base64.b64encode(value).decode() not in logs and value.decode() not in logs


def test_a_policy_granting_secrets_without_pins_is_refused_at_load(tmp_path: Path) -> None:
    unpinned = "version: 1\nsandboxes:\n  everything:\n    secrets: [api-token]\n"
    policy = tmp_path / "unpinned.yaml"
    policy.write_text(unpinned)
    from stockade.policy.loader import PolicyError, load_policy

    with pytest.raises(PolicyError, match="must pin its image by digest"):
        load_policy([tmp_path])

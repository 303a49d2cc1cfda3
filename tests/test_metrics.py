"""The Prometheus endpoint: off by default, loopback only, and counting what happens."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from stockade.config import SettingsError, load_settings
from tests.daemon_helper import HostSession, running_daemon

POLICY = """\
version: 1
rules:
  - name: echo-only
    effect: allow
    identities: ["*"]
    servers: ["scratch"]
    methods: ["scratch/echo"]
"""


def test_metrics_listen_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_METRICS_ADDRESS", "0.0.0.0:9464")
    with pytest.raises(SettingsError, match="loopback address only"):
        load_settings()
    monkeypatch.setenv("STOCKADE_METRICS_ADDRESS", "127.0.0.1:9464")
    assert load_settings().metrics_address == "127.0.0.1:9464"
    monkeypatch.delenv("STOCKADE_METRICS_ADDRESS")
    assert load_settings().metrics_address is None  # off by default


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in the metrics")


@pytest.mark.docker
@pytest.mark.usefixtures("images")
def test_metrics_count_requests_decisions_latency_and_containers(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with running_daemon(tmp_path, policy=POLICY, STOCKADE_METRICS_ADDRESS=address) as daemon:
        daemon.add_scratch_server("scratch", "--warm", "1")

        async def scenario() -> None:
            async with HostSession(daemon, "scratch") as host:
                for n in range(3):
                    await host.request("scratch/echo", {"n": n})
                await host.request("scratch/write", {"text": "no"})

        asyncio.run(scenario())
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        assert "http://" + address in daemon.cli("status").stdout
    assert value(text, "stockade_requests_total", server="scratch", decision="allow") >= 3
    assert value(text, "stockade_requests_total", server="scratch", decision="deny") == 1
    assert value(text, "stockade_relay_latency_seconds_count", server="scratch") >= 3
    assert value(text, "stockade_container_events_total", server="scratch", event="start") >= 1
    assert value(text, "stockade_pool_size", server="scratch") == 1
    assert value(text, "stockade_audit_write_seconds_count") > 0
    assert re.search(r'stockade_sessions_open\{server="scratch"\} 0\.0', text)

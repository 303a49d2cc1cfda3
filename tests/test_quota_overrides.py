"""Policy `quotas:` entries override the quota settings per identity or server (no Docker)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from stockade.policy.loader import PolicyError, load_policy
from stockade.policy.store import PolicyStore
from stockade.relay.admission import Admission, Quotas

CI = "spiffe://stockade.local/host/ci"
LAPTOP = "spiffe://stockade.local/host/laptop"
POLICY = f"""\
version: 1
rules:
  - name: all
    effect: allow
    identities: ["*"]
    servers: ["*"]
    methods: ["*"]
quotas:
  - identities: ["{CI}"]
    sessions_per_identity: 5
  - servers: ["github"]
    instances_per_server: 1
  - identities: ["{CI}"]
    servers: ["github"]
    sessions_per_identity: 3
"""


@dataclass(frozen=True)
class Live:
    identity: str
    server: str
    transport: str = "grpc"
    shared: bool = False


def admission(tmp_path: Path) -> Admission:
    (tmp_path / "test.yaml").write_text(POLICY)
    return Admission(PolicyStore(tmp_path), Quotas(sessions_per_identity=2))


def test_an_entry_raises_a_default_for_its_identity_only(tmp_path: Path) -> None:
    gate = admission(tmp_path)
    assert gate.quotas_for(CI, "time").sessions_per_identity == 5
    assert gate.quotas_for(LAPTOP, "time").sessions_per_identity == 2  # the settings'
    four = [Live(CI, "time")] * 4
    assert gate.check(CI, "time", "grpc", False, four) is None
    refused = gate.check(LAPTOP, "time", "grpc", False, [Live(LAPTOP, "time")] * 2)
    assert refused is not None and refused.quota == "sessions_per_identity"


def test_where_entries_overlap_the_lowest_wins(tmp_path: Path) -> None:
    gate = admission(tmp_path)
    assert gate.quotas_for(CI, "github").sessions_per_identity == 3
    refused = gate.check(CI, "github", "grpc", False, [Live(LAPTOP, "github")])
    assert refused is not None and refused.quota == "instances_per_server"  # 1 for github


def test_a_bad_quota_entry_is_refused_at_load_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "version: 1\nquotas:\n  - servers: [x]\n    sessions_per_identity: 0\n"
    )
    with pytest.raises(PolicyError, match=r"bad.yaml:\d+: quotas.0.sessions_per_identity"):
        load_policy([tmp_path])

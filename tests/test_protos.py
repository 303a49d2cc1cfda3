"""The checked-in generated code must match what the .proto files generate now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "daemon" / "stockade" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    fresh = tmp_path / "stockade" / "v1"
    produced = sorted(p.name for p in fresh.iterdir())
    assert produced, "protoc produced nothing"
    for name in produced:
        assert filecmp.cmp(fresh / name, GENERATED / name, shallow=False), (
            f"daemon/stockade/v1/{name} is stale: run scripts/gen-protos.sh and commit"
        )


def test_relay_frames_carry_opaque_bytes() -> None:
    from stockade.v1 import relay_pb2

    raw = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"unknown":{"kept":true}}}'
    frame = relay_pb2.ClientFrame(message=raw)
    again = relay_pb2.ClientFrame.FromString(frame.SerializeToString())
    assert again.WhichOneof("kind") == "message"
    assert again.message == raw

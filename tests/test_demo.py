"""The README's first command: the demo runs end to end and its audit trail verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("images")]


def test_the_demo_runs_and_its_audit_trail_verifies(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # nothing from this machine's own credentials
    demo = subprocess.run(
        [str(Path(sys.executable).parent / "stockade"), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert "tools: get_current_time  (the policy lets this host call only that" in demo.stdout
    assert "get_current_time(Europe/Paris) -> " in demo.stdout
    assert "the hash chain and signatures verify" in demo.stdout
    assert "the daemon stopped and removed its containers" in demo.stdout

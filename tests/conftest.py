"""Shared fixtures. Docker tests use the real engine the test command starts; no mocks of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.errors import EngineUnavailable
from stockade.sandbox.images import RECIPES, ImageBuilder
from stockade.sandbox.spec import LABEL_DAEMON

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TEST_DAEMON_ID = "pytest"


def ca_bundle() -> Path | None:
    """The CA bundle image builds trust: STOCKADE_CA_BUNDLE, else the host's, else none."""
    chosen = os.environ.get("STOCKADE_CA_BUNDLE")
    if chosen:
        return Path(chosen)
    return HOST_CA_BUNDLE if HOST_CA_BUNDLE.is_file() else None


@pytest.fixture(scope="session")
def backend() -> DockerBackend:
    try:
        return DockerBackend()
    except EngineUnavailable as exc:  # fail loudly: the test command starts the engine
        pytest.fail(f"{exc} - run the tests with scripts/test.sh, which starts one")


@pytest.fixture(scope="session")
def images(backend: DockerBackend) -> ImageBuilder:
    """Build (or confirm) every sandbox image once per test run."""
    builder = ImageBuilder(backend.client, ca_bundle=ca_bundle(), progress=print)
    builder.ensure(list(RECIPES))
    return builder


@pytest.fixture
def cleanup_containers(backend: DockerBackend) -> Iterator[None]:
    """Remove whatever containers a test created with the test daemon id, even on failure."""
    yield
    for summary in backend.list_by_label({LABEL_DAEMON: TEST_DAEMON_ID}):
        backend.stop(summary["Id"], grace_seconds=0)

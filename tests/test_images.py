"""Image builder errors that need no build."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.sandbox.docker_backend import DockerBackend
from stockade.sandbox.images import ImageBuilder, ImageBuildError

pytestmark = pytest.mark.docker


def test_unknown_recipe_is_refused(backend: DockerBackend) -> None:
    with pytest.raises(ImageBuildError, match=r"no image recipe named 'ruby' \(known: base"):
        ImageBuilder(backend.client).ensure(["ruby"])


def test_missing_ca_bundle_is_refused(backend: DockerBackend, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="is not a readable file"):
        ImageBuilder(backend.client, ca_bundle=tmp_path / "missing.pem")


def test_missing_recipes_folder_is_refused(backend: DockerBackend, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="does not exist"):
        ImageBuilder(backend.client, recipes_dir=tmp_path / "nowhere")

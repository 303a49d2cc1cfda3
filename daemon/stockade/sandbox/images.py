"""Build the sandbox images from `sandbox-images/` recipes, with no registry required.

Order: a Debian bookworm root filesystem (Debian's image if a registry answers, otherwise a
local `debootstrap` + `docker import`), then `base` on it, then `python` and `node` on base.
Each image carries the hash of its recipe (its files, its parent's hash) in a label; a build
is skipped when an image with that hash exists. A custom CA bundle is placed in the build
context for the build stages only (see the Dockerfiles): the final images never contain it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from stockade.sandbox.errors import SandboxError

LABEL_RECIPE = "io.stockade.recipe-hash"
REGISTRY_ROOTFS = "debian:bookworm-slim"
LOCAL_ROOTFS = "stockade/rootfs:bookworm"
DEBOOTSTRAP_SUITE = "bookworm"
DEBOOTSTRAP_VARIANT = "minbase"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CA_FILE_NAME = "build-ca.pem"

Progress = Callable[[str], None]


class ImageBuildError(SandboxError):
    """An image could not be built; the message says which and why."""


@dataclass(frozen=True)
class Recipe:
    name: str
    parent: str | None  # another recipe's name, or None for the one built on the rootfs

    @property
    def tag(self) -> str:
        return f"stockade/{self.name}:latest"


RECIPES: dict[str, Recipe] = {
    "base": Recipe("base", None),
    "python": Recipe("python", "base"),
    "node": Recipe("node", "base"),
    "egress": Recipe("egress", "base"),
    "pybuild": Recipe("pybuild", "base"),
    "nodebuild": Recipe("nodebuild", "base"),
}


@dataclass(frozen=True)
class BuildResult:
    name: str
    tag: str
    recipe_hash: str
    built: bool  # False when an image with the same recipe hash already existed


def default_recipes_dir() -> Path:
    """`sandbox-images/` of a source checkout, else the packaged location."""
    checkout = Path(__file__).resolve().parents[3] / "sandbox-images"
    return checkout if checkout.is_dir() else Path("/usr/share/stockade/sandbox-images")


def _hash_directory(directory: Path, extra: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


class ImageBuilder:
    """Ensure the sandbox images exist and match their recipes."""

    def __init__(
        self,
        client: docker.DockerClient,
        recipes_dir: Path | None = None,
        ca_bundle: Path | None = None,
        mirror: str = DEFAULT_MIRROR,
        progress: Progress = lambda _line: None,
    ) -> None:
        self._client = client
        self._recipes_dir = recipes_dir or default_recipes_dir()
        if not self._recipes_dir.is_dir():
            raise ImageBuildError(f"recipes folder {self._recipes_dir} does not exist")
        if ca_bundle is not None and not ca_bundle.is_file():
            raise ImageBuildError(f"CA bundle {ca_bundle} is not a readable file")
        self._ca_bundle = ca_bundle
        self._mirror = mirror
        self._progress = progress
        self._hashes: dict[str, str] = {}

    # -- public -----------------------------------------------------------------------

    def ensure(self, names: Iterable[str]) -> list[BuildResult]:
        """Build `names` (and the parents they need) unless already up to date."""
        results: list[BuildResult] = []
        done: set[str] = set()
        for name in names:
            if name not in RECIPES:
                known = ", ".join(RECIPES)
                raise ImageBuildError(f"no image recipe named {name!r} (known: {known})")
            for recipe in self._lineage(RECIPES[name]):
                if recipe.name not in done:
                    results.append(self._ensure_one(recipe))
                    done.add(recipe.name)
        return results

    def recipe_hash(self, recipe: Recipe) -> str:
        if recipe.name not in self._hashes:
            parent = (
                self.recipe_hash(RECIPES[recipe.parent]) if recipe.parent else self._ensure_rootfs()
            )
            self._hashes[recipe.name] = _hash_directory(
                self._recipes_dir / recipe.name, [recipe.name, parent]
            )
        return self._hashes[recipe.name]

    # -- recipes ----------------------------------------------------------------------

    def _lineage(self, recipe: Recipe) -> list[Recipe]:
        chain = [recipe]
        while chain[0].parent:
            chain.insert(0, RECIPES[chain[0].parent])
        return chain

    def _ensure_one(self, recipe: Recipe) -> BuildResult:
        wanted = self.recipe_hash(recipe)
        if self._label_of(recipe.tag, LABEL_RECIPE) == wanted:
            self._progress(f"{recipe.tag}: up to date ({wanted[:12]})")
            return BuildResult(recipe.name, recipe.tag, wanted, built=False)
        self._progress(f"{recipe.tag}: building ({wanted[:12]})")
        build_args = (
            {"BASE": RECIPES[recipe.parent].tag}
            if recipe.parent
            else {"ROOTFS": self._rootfs_image}
        )
        self._build(recipe, wanted, build_args)
        return BuildResult(recipe.name, recipe.tag, wanted, built=True)

    def _build(self, recipe: Recipe, recipe_hash: str, build_args: dict[str, str]) -> None:
        with tempfile.TemporaryDirectory(prefix=f"stockade-build-{recipe.name}-") as tmp:
            context = Path(tmp)
            shutil.copytree(self._recipes_dir / recipe.name, context, dirs_exist_ok=True)
            ca_target = context / CA_FILE_NAME
            if self._ca_bundle is not None:
                shutil.copyfile(self._ca_bundle, ca_target)
            else:
                ca_target.write_bytes(b"")
            stream = self._client.api.build(
                path=str(context),
                tag=recipe.tag,
                buildargs=build_args,
                labels={LABEL_RECIPE: recipe_hash},
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            self._follow_build(recipe, stream)

    def _follow_build(self, recipe: Recipe, stream: Iterable[dict[str, Any]]) -> None:
        for chunk in stream:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise ImageBuildError(f"building {recipe.tag} failed: {detail.strip()}")
            text = str(chunk.get("stream", "")).strip()
            if text.startswith("Step ") or text.startswith("Successfully tagged"):
                self._progress(f"{recipe.tag}: {text}")

    def _label_of(self, image: str, label: str) -> str | None:
        try:
            labels = self._client.images.get(image).labels
        except docker.errors.ImageNotFound:
            return None
        value = labels.get(label)
        return str(value) if value is not None else None

    # -- root filesystem --------------------------------------------------------------

    _rootfs_image: str = LOCAL_ROOTFS

    def _ensure_rootfs(self) -> str:
        """Make a bookworm rootfs image available; return its image id (part of base's hash)."""
        for candidate in (LOCAL_ROOTFS, REGISTRY_ROOTFS):
            image_id = self._image_id(candidate)
            if image_id:
                self._rootfs_image = candidate
                return image_id
        self._progress(f"rootfs: trying {REGISTRY_ROOTFS} from a registry")
        try:
            self._client.api.pull(REGISTRY_ROOTFS)
            self._rootfs_image = REGISTRY_ROOTFS
        except docker.errors.APIError:
            self._progress("rootfs: no registry answers; building it locally with debootstrap")
            self._debootstrap()
            self._rootfs_image = LOCAL_ROOTFS
        image_id = self._image_id(self._rootfs_image)
        if not image_id:
            raise ImageBuildError(f"rootfs image {self._rootfs_image} is missing after creation")
        return image_id

    def _image_id(self, image: str) -> str | None:
        try:
            return str(self._client.images.get(image).id)
        except docker.errors.ImageNotFound:
            return None

    def _debootstrap(self) -> None:
        if shutil.which("debootstrap") is None:
            raise ImageBuildError(
                "debootstrap is not installed and no registry answers; "
                "run `apt-get install debootstrap` (scripts/docker-engine.sh does)"
            )
        if os.geteuid() != 0:
            raise ImageBuildError("debootstrap needs root to build the base filesystem")
        with tempfile.TemporaryDirectory(prefix="stockade-rootfs-") as tmp:
            root = Path(tmp) / "rootfs"
            command = [
                "debootstrap",
                f"--variant={DEBOOTSTRAP_VARIANT}",
                DEBOOTSTRAP_SUITE,
                str(root),
                self._mirror,
            ]
            self._run_with_progress(command, "debootstrap")
            tarball = Path(tmp) / "rootfs.tar"
            self._run_with_progress(
                ["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."], "tar"
            )
            self._progress(f"rootfs: importing as {LOCAL_ROOTFS}")
            repository, tag = LOCAL_ROOTFS.split(":")
            self._client.api.import_image_from_file(
                str(tarball),
                repository=repository,
                tag=tag,
                changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"],
            )

    def _run_with_progress(self, command: list[str], what: str) -> None:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process:
            assert process.stdout is not None  # noqa: S101 - set by stdout=PIPE
            last = ""
            for line in process.stdout:
                last = line.strip()
                if last.startswith(
                    (
                        "I: Retrieving",
                        "I: Validating",
                        "I: Extracting",
                        "I: Unpacking",
                        "I: Installing",
                        "I: Configuring",
                    )
                ):
                    continue  # hundreds of these; the stage lines below are enough
                if last:
                    self._progress(f"{what}: {last}")
            if process.wait() != 0:
                raise ImageBuildError(f"{what} failed (exit {process.returncode}): {last}")

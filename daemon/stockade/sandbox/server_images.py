"""Per-server images `stockade/srv/NAME:<recipe-hash>`, built FROM our base images.

A PyPI server gets a venv at /opt/srv installed with `pip install --require-hashes
--no-deps --only-binary=:all:` from its lock (wheels only, so no package code runs at build
time, unless `allow_source_builds`); an npm server gets /opt/srv/node_modules from `npm ci
--ignore-scripts` (scripts only with `allow_install_scripts`). The build stage may trust
the caller's CA bundle; the final stage is FROM stockade/python or stockade/node, so it
keeps uid 10001 and the base's contents, and never holds that CA or a package manager's
cache. Optional Debian packages (`apt`, e.g. git for mcp-server-git) are part of the recipe.

The recipe hash covers the lock, the Dockerfile template, the options and the ids of the parent
images: the same hash means the same image, so a second run skips the build. An exactly
pinned package also skips resolution when an image for it (same parents) already exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from stockade.sandbox.images import CA_FILE_NAME, LABEL_RECIPE, ImageBuilder, Progress
from stockade.sandbox.locks import Lock, LockError, lock_npm, lock_pypi, parse_npm, parse_pypi

TEMPLATE_VERSION = "1"
LABEL_SPEC = "io.stockade.spec-key"
LABEL_SOURCE = "io.stockade.source"
LABEL_LOCK = "io.stockade.lock-hash"
LABEL_ENTRYPOINTS = "io.stockade.entrypoints"
SERVER_ROOT = "/opt/srv"
EXACT_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$")

PARENTS = {
    "pypi": ("stockade/pybuild:latest", "stockade/python:latest"),
    "npm": ("stockade/nodebuild:latest", "stockade/node:latest"),
}

PYPI_DOCKERFILE = """\
FROM {build} AS build
USER root
ARG PIP_INDEX_URL
COPY requirements.lock {ca} /build/
RUN if [ -s /build/{ca} ]; then export PIP_CERT=/build/{ca}; fi \\
 && python3 -m venv {root} \\
 && {root}/bin/pip install --no-cache-dir --disable-pip-version-check -q \\
      --require-hashes --no-deps {binary} -r /build/requirements.lock \\
 && {root}/bin/pip uninstall -y -q pip \\
 && cp /build/requirements.lock {root}/stockade.lock

FROM {run}
USER root
{apt}COPY --from=build {root} {root}
ENV PATH={root}/bin:/opt/mcp/bin:/usr/local/bin:/usr/bin:/bin
USER 10001:10001
"""

NPM_DOCKERFILE = """\
FROM {build} AS build
USER root
COPY package.json package-lock.json {ca} {root}/
WORKDIR {root}
RUN if [ -s {ca} ]; then export NPM_CONFIG_CAFILE={root}/{ca}; fi \\
 && npm ci --omit=dev --no-audit --no-fund --loglevel=error {scripts} \\
 && rm -f {ca}

FROM {run}
USER root
{apt}COPY --from=build {root} {root}
ENV PATH={root}/node_modules/.bin:/opt/mcp/node_modules/.bin:/usr/local/bin:/usr/bin:/bin
USER 10001:10001
"""

APT_LINE = (
    "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends {packages} "
    ">/dev/null && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb\n"
)


class ServerImageError(LockError):
    """A per-server image could not be built; the message is one line."""


@dataclass(frozen=True)
class BuildOptions:
    index: str | None = None  # PyPI index URL or npm registry
    ca_bundle: Path | None = None
    entrypoint: str | None = None
    apt: tuple[str, ...] = ()
    allow_install_scripts: bool = False
    allow_source_builds: bool = False  # pypi: sdists (their setup code runs at build)


@dataclass(frozen=True)
class ServerImage:
    tag: str
    image_id: str
    kind: str
    package: str
    version: str
    lock_hash: str
    recipe_hash: str
    command: tuple[str, ...]
    built: bool  # False: an image with the same recipe existed


def _digest(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


class ServerImageBuilder:
    def __init__(self, client: docker.DockerClient, progress: Progress) -> None:
        self._client = client
        self._progress = progress

    def ensure(self, name: str, kind: str, spec: str, options: BuildOptions) -> ServerImage:
        """Resolve `spec`, then build `stockade/srv/NAME:<hash>` unless it exists."""
        if kind not in PARENTS:
            raise ServerImageError(f"unknown source kind {kind!r}")
        for apt in options.apt:
            if not apt.replace("-", "").replace(".", "").replace("+", "").isalnum():
                raise ServerImageError(f"not a Debian package name: {apt!r}")
        # Our own images first (built, or confirmed current by their recipe hash).
        recipes = [ref.split("/")[1].split(":")[0] for ref in PARENTS[kind]]
        ImageBuilder(self._client, ca_bundle=options.ca_bundle, progress=self._progress).ensure(
            recipes
        )
        parents = [self._image_id(ref) for ref in PARENTS[kind]]
        package, version = parse_pypi(spec) if kind == "pypi" else parse_npm(spec)
        settings = [
            TEMPLATE_VERSION,
            PYPI_DOCKERFILE if kind == "pypi" else NPM_DOCKERFILE,  # a recipe change rebuilds
            APT_LINE,
            kind,
            options.index or "",
            ",".join(options.apt),
            str(options.allow_install_scripts),
            str(options.allow_source_builds),
            *parents,
        ]
        exact = version if version and EXACT_VERSION.fullmatch(version) else None
        spec_key = _digest([package, exact, *settings]) if exact else None
        if spec_key and (cached := self._cached(spec_key, options.entrypoint)):
            self._progress(f"{name}: {kind} {package} {exact}: up to date ({cached.tag})")
            return cached
        self._progress(f"{name}: resolving {spec} ({kind})")
        lock = (
            lock_pypi(
                self._client, spec, options.index, options.ca_bundle, options.allow_source_builds
            )
            if kind == "pypi"
            else lock_npm(self._client, spec, options.index, options.ca_bundle)
        )
        self._progress(f"{name}: resolved {lock.package} {lock.version}")
        lock_hash = _digest(lock.files[k] for k in sorted(lock.files))
        recipe_hash = _digest([lock_hash, *settings])
        tag = f"stockade/srv/{name}:{recipe_hash[:16]}"
        labels = {
            LABEL_RECIPE: recipe_hash,
            LABEL_SOURCE: f"{kind}:{lock.package}=={lock.version}",
            LABEL_LOCK: lock_hash,
            LABEL_ENTRYPOINTS: json.dumps(list(lock.entrypoints)),
        }
        if exact:
            labels[LABEL_SPEC] = _digest([package, lock.version, *settings])
        built = False
        if self._label(tag, LABEL_RECIPE) != recipe_hash:
            self._progress(f"{name}: building {tag}")
            self._build(tag, kind, lock, options, labels)
            built = True
        else:
            self._progress(f"{name}: {tag} up to date")
        return self._describe(tag, options.entrypoint, built)

    # -- internals --------------------------------------------------------------------

    def _cached(self, spec_key: str, entrypoint: str | None) -> ServerImage | None:
        found = self._client.images.list(filters={"label": f"{LABEL_SPEC}={spec_key}"})
        tagged = [i for i in found if i.tags]
        if not tagged:
            return None
        return self._describe(str(tagged[0].tags[0]), entrypoint, built=False)

    def _describe(self, tag: str, entrypoint: str | None, built: bool) -> ServerImage:
        image = self._client.images.get(tag)
        labels: dict[str, str] = image.labels
        kind, _, pinned = labels[LABEL_SOURCE].partition(":")
        package, _, version = pinned.partition("==")
        scripts = tuple(json.loads(labels.get(LABEL_ENTRYPOINTS, "[]")))
        chosen = _choose_entrypoint(package, scripts, entrypoint)
        folder = "bin" if kind == "pypi" else "node_modules/.bin"
        return ServerImage(
            tag=tag,
            image_id=str(image.id),
            kind=kind,
            package=package,
            version=version,
            lock_hash=labels[LABEL_LOCK],
            recipe_hash=labels[LABEL_RECIPE],
            command=(f"{SERVER_ROOT}/{folder}/{chosen}",),
            built=built,
        )

    def _build(
        self, tag: str, kind: str, lock: Lock, options: BuildOptions, labels: dict[str, str]
    ) -> None:
        build_image, run_image = PARENTS[kind]
        apt = APT_LINE.format(packages=" ".join(options.apt)) if options.apt else ""
        template = PYPI_DOCKERFILE if kind == "pypi" else NPM_DOCKERFILE
        dockerfile = template.format(
            build=build_image,
            run=run_image,
            ca=CA_FILE_NAME,
            root=SERVER_ROOT,
            apt=apt,
            scripts="" if options.allow_install_scripts else "--ignore-scripts",
            binary="" if options.allow_source_builds else "--only-binary=:all:",
        )
        with tempfile.TemporaryDirectory(prefix="stockade-srv-") as tmp:
            context = Path(tmp)
            (context / "Dockerfile").write_text(dockerfile)
            for file_name, content in lock.files.items():
                (context / file_name).write_text(content)
            ca_target = context / CA_FILE_NAME
            if options.ca_bundle is not None:
                shutil.copyfile(options.ca_bundle, ca_target)
            else:
                ca_target.write_bytes(b"")
            build_args = (
                {"PIP_INDEX_URL": options.index} if kind == "pypi" and options.index else {}
            )
            stream = self._client.api.build(
                path=str(context),
                tag=tag,
                buildargs=build_args,
                labels=labels,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            self._follow(tag, stream)

    def _follow(self, tag: str, stream: Iterable[dict[str, Any]]) -> None:
        for chunk in stream:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                lines = [line for line in str(detail).splitlines() if line.strip()]
                raise ServerImageError(f"building {tag} failed: {' / '.join(lines[-3:])}")
            text = str(chunk.get("stream", "")).strip()
            if text.startswith("Step "):
                self._progress(f"{tag}: {text}")

    def _image_id(self, ref: str) -> str:
        try:
            return str(self._client.images.get(ref).id)
        except docker.errors.ImageNotFound:
            raise ServerImageError(
                f"base image {ref} is missing: run `stockade image build` first"
            ) from None

    def _label(self, ref: str, label: str) -> str | None:
        try:
            value = self._client.images.get(ref).labels.get(label)
        except docker.errors.ImageNotFound:
            return None
        return str(value) if value is not None else None


def _choose_entrypoint(package: str, scripts: tuple[str, ...], wanted: str | None) -> str:
    """--entrypoint if it is one of the package's; else its only one; else its own name."""
    if wanted:
        if scripts and wanted not in scripts:
            raise ServerImageError(
                f"{package} has no entry point {wanted!r} (it has: {', '.join(scripts)})"
            )
        return wanted
    if len(scripts) == 1:
        return scripts[0]
    base = package.rsplit("/", 1)[-1]
    if base in scripts:
        return base
    if not scripts:
        raise ServerImageError(f"{package} declares no entry point: give --entrypoint")
    raise ServerImageError(
        f"{package} has several entry points ({', '.join(scripts)}): choose with --entrypoint"
    )

"""Resolve a PyPI or npm server to an exact version and a lock with hashes.

Resolution runs in a short-lived container from `stockade/pybuild` or `stockade/nodebuild`
(the same Python and Node the server images are built with, so markers and platforms
agree), with the default bridge network, the caller's CA bundle mounted read-only and the
index or registry the caller chose. Nothing from the host's Python or Node is used.

- PyPI: `pip download` of the package and all its dependencies, then a requirements lock
  with one `name==version --hash=sha256:...` line per file, and the package's console
  scripts (from its wheel's entry_points.txt).
- npm: `npm view` for the exact version and the package's bins, then a generated
  package.json pinning that version and `npm install --package-lock-only --ignore-scripts`
  for package-lock.json (its `integrity` fields are the hashes `npm ci` checks).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from stockade.sandbox.errors import SandboxError

CA_TARGET = "/etc/stockade-build-ca.pem"
PYPI_NAME = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9,._-]+\])?(==([A-Za-z0-9.+!-]+))?$"
)
NPM_NAME = re.compile(
    r"^((@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*)(@([A-Za-z0-9.^~<>=| *+-]+))?$"
)
LOCK_OUTPUT_LIMIT = 4 * 1024 * 1024

# Run inside stockade/pybuild: argv[1] is the requirement, argv[2] pip's binary policy
# (wheels only by default: no package's setup.py runs). Prints one JSON object.
PYPI_SCRIPT = r"""
import hashlib, json, pathlib, re, subprocess, sys, zipfile
req, binary = sys.argv[1], sys.argv[2]
subprocess.run([sys.executable, "-m", "venv", "/tmp/v"], check=True)
if subprocess.run(["/tmp/v/bin/pip", "download", "--disable-pip-version-check", "-q",
                   binary, "-d", "/tmp/d", req], stdout=sys.stderr).returncode:
    sys.exit(1)  # pip said why on stderr
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = norm(re.split(r"[\[=<>!~ ]", req, maxsplit=1)[0])
lines, version, scripts = [], None, []
for path in sorted(pathlib.Path("/tmp/d").iterdir()):
    stem = re.sub(r"\.(whl|tar\.gz|zip|tar\.bz2)$", "", path.name)
    name, _, rest = stem.partition("-")
    ver = rest.split("-")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lines.append(f"{norm(name)}=={ver} --hash=sha256:{digest}")
    if norm(name) == want:
        version = ver
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                for member in wheel.namelist():
                    if member.endswith(".dist-info/entry_points.txt"):
                        section = None
                        for line in wheel.read(member).decode().splitlines():
                            line = line.strip()
                            if line.startswith("["):
                                section = line.strip("[]")
                            elif section == "console_scripts" and "=" in line:
                                scripts.append(line.split("=")[0].strip())
print(json.dumps({"version": version, "lock": "\n".join(lines) + "\n", "entrypoints": scripts}))
"""

# Run inside stockade/nodebuild: argv[1] the package, argv[2] the version or range.
NPM_SCRIPT = r"""
const {execFileSync} = require("child_process");
const fs = require("fs");
const [pkg, range] = process.argv.slice(1);
process.on("uncaughtException", () => process.exit(1));  // npm said why on stderr
const npm = (args) =>
  execFileSync("npm", args, {encoding: "utf8", stdio: ["ignore", "pipe", "inherit"]});
let version = JSON.parse(npm(["view", `${pkg}@${range}`, "version", "--json"]));
if (Array.isArray(version)) version = version[version.length - 1];
const binText = npm(["view", `${pkg}@${version}`, "bin", "--json"]).trim();
let bin = binText ? JSON.parse(binText) : {};
if (typeof bin === "string") bin = {[pkg.split("/").pop()]: bin};
fs.mkdirSync("/tmp/w");
process.chdir("/tmp/w");
const manifest = {name: "stockade-server", version: "0.0.0", private: true,
                  dependencies: {[pkg]: version}};
fs.writeFileSync("package.json", JSON.stringify(manifest, null, 2) + "\n");
npm(["install", "--package-lock-only", "--ignore-scripts", "--no-audit", "--no-fund",
     "--loglevel=error"]);
console.log(JSON.stringify({version, entrypoints: Object.keys(bin),
  manifest: fs.readFileSync("package.json", "utf8"),
  lock: fs.readFileSync("package-lock.json", "utf8")}));
"""


class LockError(SandboxError):
    """The package could not be resolved; the message is one line."""


@dataclass(frozen=True)
class Lock:
    kind: str  # "pypi" or "npm"
    package: str
    version: str
    files: dict[str, str]  # file name in the build context -> content
    entrypoints: tuple[str, ...]


def parse_pypi(spec: str) -> tuple[str, str | None]:
    """`name[extra]==1.2` -> ("name[extra]", "1.2"); LockError when malformed."""
    match = PYPI_NAME.fullmatch(spec.strip())
    if not match:
        raise LockError(f"not a PyPI requirement: {spec!r} (use NAME or NAME==VERSION)")
    return match.group(1) + (match.group(2) or ""), match.group(4)


def parse_npm(spec: str) -> tuple[str, str | None]:
    """`@scope/name@1.2` -> ("@scope/name", "1.2"); LockError when malformed."""
    match = NPM_NAME.fullmatch(spec.strip())
    if not match:
        raise LockError(f"not an npm package: {spec!r} (use NAME or NAME@VERSION)")
    return match.group(1), match.group(4)


def _run(
    client: docker.DockerClient,
    image: str,
    command: list[str],
    *,
    environment: dict[str, str],
    ca_bundle: Path | None,
    what: str,
) -> dict[str, object]:
    volumes = {}
    if ca_bundle is not None:
        volumes[str(ca_bundle.resolve())] = {"bind": CA_TARGET, "mode": "ro"}
    try:
        container = client.containers.create(
            image,
            command,
            environment=environment,
            volumes=volumes,
            user="10001:10001",
            read_only=True,
            tmpfs={"/tmp": "rw,exec,nosuid,nodev,size=512m"},  # noqa: S108 - its own tmpfs (a venv runs there)
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit="1g",
            pids_limit=256,
            labels={"io.stockade.role": "lock"},
        )
    except docker.errors.ImageNotFound:
        raise LockError(f"{image} is missing: run `stockade image build`") from None
    except docker.errors.APIError as exc:
        raise LockError(f"{what}: {exc}") from None
    # Removed however it ends: a start the engine refuses leaves a created container behind
    # (the SDK's run(remove=True) removes only after a start that worked).
    try:
        container.start()
        status = container.wait()
        output = container.logs(stdout=True, stderr=False)
        if status.get("StatusCode") != 0:
            raw = container.logs(stdout=False, stderr=True)
            said = raw.decode(errors="replace").splitlines()
            code = status.get("StatusCode")
            raise LockError(f"{what}: {_reason(said) or f'exit {code}'}")
    except docker.errors.APIError as exc:
        raise LockError(f"{what}: {exc}") from None
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    if not isinstance(output, bytes) or len(output) > LOCK_OUTPUT_LIMIT:
        raise LockError(f"{what}: the resolver said more than {LOCK_OUTPUT_LIMIT} bytes")
    try:
        result: dict[str, object] = json.loads(output.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LockError(f"{what}: the resolver gave no answer") from None
    return result


def _reason(lines: list[str]) -> str:
    """The resolver's own error line (pip's `ERROR:`, npm's `npm error`), else its last."""
    said = [line.strip() for line in lines if line.strip()]
    errors = [
        line
        for line in said
        if line.startswith(("ERROR:", "npm ERR!", "npm error")) and "A complete log" not in line
    ]
    chosen = errors[:2] if errors else said[-1:]
    return " / ".join(chosen)[:400]


ONLY_WHEELS = "--only-binary=:all:"
SOURCES_TOO = "--prefer-binary"


def lock_pypi(
    client: docker.DockerClient,
    spec: str,
    index_url: str | None,
    ca_bundle: Path | None,
    allow_source_builds: bool = False,
) -> Lock:
    """Resolve with wheels only unless `allow_source_builds` (an sdist runs its setup
    code while it is resolved and built)."""
    name, version = parse_pypi(spec)
    # Two tries, short timeouts: a wrong index fails in seconds, with pip's own words.
    environment = {"HOME": "/tmp", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "1"}  # noqa: S108
    environment["PIP_TIMEOUT"] = "15"
    if index_url:
        environment["PIP_INDEX_URL"] = index_url
    if ca_bundle is not None:
        environment["PIP_CERT"] = CA_TARGET
    requirement = f"{name}=={version}" if version else name
    try:
        found = _run(
            client,
            "stockade/pybuild:latest",
            [
                "python3",
                "-c",
                PYPI_SCRIPT,
                requirement,
                SOURCES_TOO if allow_source_builds else ONLY_WHEELS,
            ],
            environment=environment,
            ca_bundle=ca_bundle,
            what=f"resolving {requirement} on PyPI failed",
        )
    except LockError as exc:
        if allow_source_builds or "No matching distribution" not in str(exc):
            raise
        raise LockError(
            f"{exc} (wheels only: --allow-source-builds lets pip build sdists, "
            "whose setup code then runs)"
        ) from None
    if not found.get("version"):
        raise LockError(f"resolving {requirement}: the package itself was not downloaded")
    return Lock(
        kind="pypi",
        package=re.sub(r"\[.*\]$", "", name),
        version=str(found["version"]),
        files={"requirements.lock": str(found["lock"])},
        entrypoints=tuple(str(e) for e in found.get("entrypoints") or []),  # type: ignore[attr-defined]
    )


def lock_npm(
    client: docker.DockerClient, spec: str, registry: str | None, ca_bundle: Path | None
) -> Lock:
    name, version = parse_npm(spec)
    environment = {
        "HOME": "/tmp",  # noqa: S108 - the locking container's own tmpfs
        "npm_config_cache": "/tmp/.npm",  # noqa: S108
        "npm_config_update_notifier": "false",
        "npm_config_fetch_retries": "1",  # a wrong registry fails in seconds
        "npm_config_fetch_retry_mintimeout": "1000",
        "npm_config_fetch_retry_maxtimeout": "3000",
    }
    if registry:
        environment["npm_config_registry"] = registry
    if ca_bundle is not None:
        environment["npm_config_cafile"] = CA_TARGET
    found = _run(
        client,
        "stockade/nodebuild:latest",
        ["node", "-e", NPM_SCRIPT, name, version or "latest"],
        environment=environment,
        ca_bundle=ca_bundle,
        what=f"resolving {name}@{version or 'latest'} on npm failed",
    )
    return Lock(
        kind="npm",
        package=name,
        version=str(found["version"]),
        files={"package.json": str(found["manifest"]), "package-lock.json": str(found["lock"])},
        entrypoints=tuple(str(e) for e in found.get("entrypoints") or []),  # type: ignore[attr-defined]
    )

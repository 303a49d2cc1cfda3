"""Registration's truth test: pin the image, then start the server once and ask who it is.

`vet` is what `AddServer` runs: secret variables set and granted, the image pinned, then
(unless skipped) the trial.

`pin` resolves the definition's image on the engine to its id (the id instances then run,
so a re-tagged image never changes a registered server) and records its repository digest
and its own USER. `run_trial` starts one instance exactly as the warm pool would (same
provisioner: policy, limits, mounts, egress, secrets; nothing more), speaks `initialize`
and the lists the server advertises, and always removes the container. Any failure is a
`TrialFailed` whose message is one line an operator can act on.

`describe_start_error` turns the engine's long errors (exec failures, missing images) into
that one line; the warm pool uses it too, so `server status` says the same thing.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from stockade.probe import ProbeError, Survey, survey
from stockade.registry import ServerDefinition, ServerSource, TrialReport
from stockade.sandbox.errors import ImageMissing, SandboxError
from stockade.sandbox.instance import ExitReport, Instance
from stockade.sandbox.runtime import SandboxRuntime
from stockade.supervisor.provisioning import Provisioner
from stockade.supervisor.spec_rules import image_repository
from stockade.wire.lines import OversizedLine

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 300.0
LINE_LIMIT = 300  # characters of an error line; engines and servers can say a lot


class TrialFailed(SandboxError):
    """The server did not prove it serves; the message is one line."""


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    """Collapse whitespace and control characters; cut to `limit` characters."""
    flat = re.sub(r"[\x00-\x1f\x7f\s]+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_start_error(definition: ServerDefinition, exc: BaseException) -> str:
    """The engine's refusal to start an instance, as one line naming the likely cause."""
    text = str(exc)
    command = definition.argv[0] if definition.argv else "(the image's default)"
    lowered = text.lower()
    # The engine's words (the command is the container's), or the shell's (a server whose
    # stdio are pipes is started by `sh -c 'exec ...'`: sandbox/stdio_pipes.py).
    if (
        "executable file not found" in lowered
        or "no such file or directory" in lowered
        or re.search(r"\bsh: \d+: exec: .*: not found", lowered)
    ):
        return (
            f"command {command!r} is not in image {definition.image!r} "
            "(exit 127: command not found)"
        )
    if "exec" in lowered and "failed" in lowered and "tini" in lowered:
        return f"command {command!r} in image {definition.image!r} could not be run (exit 126)"
    if "permission denied" in lowered and "exec" in lowered:
        return f"command {command!r} in image {definition.image!r} is not executable (exit 126)"
    if isinstance(exc, ImageMissing):
        return (
            f"image {definition.image!r} is not present on the Docker engine "
            "(`stockade server add --image` pulls it; `stockade image build` builds ours)"
        )
    return one_line(text)


def describe_exit(definition: ServerDefinition, report: ExitReport, stderr_tail: list[str]) -> str:
    """How an instance ended by itself, with the last thing it said on stderr."""
    if report.exit_code in (126, 127) and not report.oom_killed:  # tini could not exec it
        return describe_start_error(definition, SandboxError(" ".join(stderr_tail)))
    said = one_line(stderr_tail[-1], 160) if stderr_tail else ""
    return report.describe() + (f"; last stderr: {said}" if said else "")


def pin(backend: SandboxRuntime, definition: ServerDefinition) -> ServerDefinition:
    """The definition with its image pinned to the id present now (ImageMissing if none)."""
    info = backend.image_info(definition.run_image)
    if definition.image_id and info.id != definition.image_id:
        raise TrialFailed(f"image {definition.image!r} is not the pinned {definition.image_id}")
    source = definition.source or ServerSource(kind="image")
    digest = _repo_digest(definition.image, info.repo_digests)
    update = {"digest": source.digest or digest, "image_user": info.user}
    return definition.model_copy(
        update={"image_id": info.id, "source": source.model_copy(update=update)}
    )


async def vet(
    provisioner: Provisioner,
    backend: SandboxRuntime,
    definition: ServerDefinition,
    *,
    start: Callable[[ServerDefinition], Awaitable[Instance]] | None,
    stop: Callable[[Instance], Awaitable[object]],
    timeout: float,
) -> ServerDefinition:
    """What registration keeps: the definition pinned and, with `start`, trial-checked.

    Secret variables must be set and granted even without a trial. Raises SandboxError
    (TrialFailed, ImageMissing) with one line; the trial's container is gone when this
    returns, whatever happened.
    """
    await _secrets_ready(provisioner, backend, definition)
    try:
        pinned = await asyncio.to_thread(pin, backend, definition)
    except SandboxError as exc:
        raise SandboxError(describe_start_error(definition, exc)) from None
    if start is None:
        return pinned

    async def start_pinned() -> Instance:
        return await start(pinned)

    bounded = min(timeout or DEFAULT_TIMEOUT, MAX_TIMEOUT)
    report = await run_trial(start_pinned, stop, pinned, bounded)
    return pinned.model_copy(update={"checked": report})


async def _secrets_ready(
    provisioner: Provisioner, backend: SandboxRuntime, definition: ServerDefinition
) -> None:
    """Refuse a server whose secret variables are not set, or not granted by policy.

    A grant must pin the image by digest and the command (policy/sandbox.py), which an
    operator cannot know before the image is built: the refusal says the exact pins."""
    needed = tuple(sorted(set(definition.secret_env.values())))
    if not needed:
        return
    missing = await asyncio.to_thread(provisioner.missing_secrets, needed)
    if missing:
        names = ", ".join(missing)
        raise SandboxError(
            f"needs the secret(s) {names}: set them first with `stockade secret set NAME`"
        )
    granted = provisioner.effective(definition).secrets
    ungranted = [name for name in needed if name not in granted]
    if ungranted:
        try:
            digest = (await asyncio.to_thread(backend.image_digests, definition.image))[0]
            repository = image_repository(definition.image)
            pins = f"image: {repository}@{digest}, command: {json.dumps(list(definition.argv))}, "
        except SandboxError:
            pins = ""
        raise SandboxError(
            f"needs the secret(s) {', '.join(ungranted)}, which its sandbox policy does not "
            f"grant (under sandboxes: {definition.name}: {pins}"
            f"secrets: {json.dumps(sorted(ungranted))})"
        )


def _repo_digest(ref: str, repo_digests: tuple[str, ...]) -> str | None:
    """`repo@sha256:...` of `ref`, when it came from a registry (built images have none)."""
    if "@sha256:" in ref:
        return ref
    name, colon, tag = ref.rpartition(":")
    repo = name if colon and "/" not in tag else ref
    return next((d for d in repo_digests if d.startswith(repo + "@")), None)


async def run_trial(
    start: Callable[[], Awaitable[Instance]],
    stop: Callable[[Instance], Awaitable[object]],
    definition: ServerDefinition,
    timeout: float,
) -> TrialReport:
    """Start one instance with `start`, survey it within `timeout`, always `stop` it."""
    began = time.monotonic()
    try:
        instance = await start()
    except SandboxError as exc:
        raise TrialFailed(describe_start_error(definition, exc)) from None
    try:
        answered = await _survey_instance(instance, definition, timeout)
    finally:
        await stop(instance)
    return TrialReport(
        server_name=answered.server_name,
        server_version=answered.server_version,
        protocol_version=answered.protocol_version,
        tools=answered.tools,
        prompts=answered.prompts,
        resources=answered.resources,
        at=time.time(),
        seconds=round(time.monotonic() - began, 3),
    )


async def _survey_instance(
    instance: Instance, definition: ServerDefinition, timeout: float
) -> Survey:
    queue: asyncio.Queue[bytes | OversizedLine] = asyncio.Queue(maxsize=64)

    async def sink(line: bytes | OversizedLine) -> None:
        await queue.put(line)

    async def lines() -> AsyncIterator[bytes | object]:
        while True:
            yield await queue.get()

    instance.bind(sink)
    asking: asyncio.Future[Survey] = asyncio.ensure_future(
        asyncio.wait_for(survey(instance.send, lines()), timeout)
    )
    ended: asyncio.Future[ExitReport] = asyncio.ensure_future(asyncio.shield(instance.exited))
    try:
        waited: set[asyncio.Future[Any]] = {asking, ended}
        done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if asking in done:
            try:
                return asking.result()
            except TimeoutError:
                raise TrialFailed(f"no answer to initialize within {timeout:.0f}s") from None
            except (ProbeError, OSError, ConnectionError) as exc:
                raise TrialFailed(one_line(f"the server did not answer as MCP: {exc}")) from None
        report = ended.result()
        tail = instance.stderr.since(max(0, instance.stderr.total - 5))
        ended_how = describe_exit(definition, report, tail)
        if report.exit_code in (126, 127):
            raise TrialFailed(ended_how)
        raise TrialFailed(f"the server {ended_how} before answering initialize")
    finally:
        for task in (asking, ended):
            task.cancel()

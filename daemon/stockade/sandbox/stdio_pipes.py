"""A server's stdin and stdout as two named pipes, so its messages skip the engine.

Why: through Docker's attach socket every message is copied twice more in each direction
(dockerd, then containerd's shim, each a process to wake), and the daemon decodes Docker's
frames. A round trip of one line to an echo server in a hardened container takes 0.25 ms
through `docker run -i` and 0.07 ms through two FIFOs (`bench/stdio_paths.py`, p50).

How: for instance I the daemon makes `RUN_DIR/DAEMON/I/in` and `.../out` (FIFOs owned by
the container user, mode 0600, in a 0711 folder under two 0700 ones: nobody else on the
host reaches them) and mounts the instance's folder read-only at
`/run/stockade-io`; the container's command becomes `sh -c 'exec "$@" <in >out' sh ARGV`:
the shell opens the two pipes and replaces itself with the server, which then has them as
its stdin and stdout. stderr stays on the attach socket (logs, and the shell's own error
if the server cannot be run), and so does the container's end: the end of `out` is only the
end of the server's stdout (it may close it and live on), so the output ends when the attach
stream does.

What the server can do with the folder: read its own stdin and write its own stdout (it
already can), open them again (the same), nothing else: it is read-only, one per instance,
and FIFOs hold no data once read. The sandbox is otherwise the same container.

Used only where it is known to work: stdio servers on runc (gVisor's gofer is another
filesystem path) in images built from Stockade's recipes (they have /bin/sh and no
ENTRYPOINT), for sessions' own instances. A shared instance keeps the attach socket: it
must outlive a daemon restart, and a FIFO without its reader would end the server.

The daemon keeps a read end of `in` open that it never reads: a write then never fails
for want of a reader (before the server opens it), and the server's stdin never sees an
end (as with the attach socket, stdin is never closed; the server is stopped by signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from stockade.sandbox.attached import READ_CHUNK, AttachedStdio, _AttachReader, write_line
from stockade.sandbox.pace import YIELD_EVERY, OutputPace
from stockade.sandbox.spec import BindMount, ContainerSpec
from stockade.wire.lines import LineSplitter, OversizedLine

CONTAINER_DIR = "/run/stockade-io"


class PipesError(Exception):
    """The pipes could not be made (the folder is not ours, the filesystem refuses)."""


class StdioPipes:
    """Per daemon: `run_dir/DAEMON_ID/INSTANCE_ID/{in,out}`."""

    def __init__(self, run_dir: Path, daemon_id: str) -> None:
        self._root = run_dir / daemon_id

    def _ensure_root(self) -> None:
        self._root.parent.parent.mkdir(parents=True, exist_ok=True)
        for folder in (self._root.parent, self._root):
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                raise PipesError(f"{folder} is not a folder owned by this daemon")
            os.chmod(folder, 0o700)  # nobody else on the host reaches the pipes

    def make(self, instance_id: str, user: str) -> Path:
        """The instance's folder with its two FIFOs, owned by the container user."""
        self._ensure_root()
        uid, _, gid = user.partition(":")
        folder = self._root / instance_id
        folder.mkdir(mode=0o700)
        try:
            for name in ("in", "out"):
                os.mkfifo(folder / name, 0o600)
                os.chown(folder / name, int(uid), int(gid or uid))
            # Mounted as the container's /run/stockade-io: its user passes, lists nothing.
            os.chmod(folder, 0o711)  # noqa: S103
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def remove(self, instance_id: str) -> None:
        shutil.rmtree(self._root / instance_id, ignore_errors=True)

    def remove_all_except(self, keep: set[str]) -> int:
        """Remove folders of instances that no longer exist (left by a crash)."""
        if not self._root.is_dir():
            return 0
        stale = [p for p in self._root.iterdir() if p.name not in keep]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)


def piped(spec: ContainerSpec, folder: Path) -> ContainerSpec:
    """`spec` with its command run by a shell that opens the pipes first."""
    script = f'exec "$@" <{CONTAINER_DIR}/in >{CONTAINER_DIR}/out'
    return spec.model_copy(
        update={
            "command": ("/bin/sh", "-c", script, "sh", *spec.command),
            "mounts": (*spec.mounts, BindMount(source=str(folder), target=CONTAINER_DIR)),
        }
    )


class PipedStdio:
    """stdin and stdout over the pipes, stderr (and the container's end) over `attached`."""

    def __init__(
        self,
        attached: AttachedStdio,
        max_line_bytes: int,
        *,
        reader: _AttachReader,
        read_transport: asyncio.BaseTransport,
        writer: asyncio.StreamWriter,
        keeper: int,
    ) -> None:
        self._attached = attached
        self._reader = reader
        self._read_transport = read_transport
        self._writer = writer
        self._keeper = keeper
        self._stdout = LineSplitter(max_line_bytes)
        self._write_lock = asyncio.Lock()
        self.pace: OutputPace = attached.pace
        self._stderr = asyncio.create_task(self._drain_stderr(), name="stderr")

    @classmethod
    async def open(cls, attached: AttachedStdio, folder: Path, max_line_bytes: int) -> PipedStdio:
        """Open both pipes (before the container starts: its shell waits for them)."""
        loop = asyncio.get_running_loop()
        out = os.open(folder / "out", os.O_RDONLY | os.O_NONBLOCK)
        keeper = os.open(folder / "in", os.O_RDONLY | os.O_NONBLOCK)
        try:
            stdin = os.open(folder / "in", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            os.close(out)
            os.close(keeper)
            raise
        reader = _AttachReader(limit=READ_CHUNK)
        stdout_file, stdin_file = os.fdopen(out, "rb", buffering=0), os.fdopen(stdin, "wb", 0)
        read_transport: asyncio.BaseTransport | None = None
        try:
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), stdout_file
            )
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, stdin_file
            )
        except BaseException:
            if read_transport is not None:
                read_transport.close()
            stdout_file.close()
            stdin_file.close()
            os.close(keeper)
            raise
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return cls(
            attached,
            max_line_bytes,
            reader=reader,
            read_transport=read_transport,
            writer=writer,
            keeper=keeper,
        )

    async def _drain_stderr(self) -> None:
        """The attach stream: stderr lines go to the instance's callback as before."""
        async for _ in self._attached.lines():
            pass  # stdout is on the pipe: nothing comes here

    async def send(self, message: bytes) -> None:
        """Write one message as one line. The caller guarantees it holds no raw newline."""
        await write_line(self._writer, self._write_lock, message)

    async def lines(self) -> AsyncIterator[bytes | OversizedLine]:
        """stdout lines as they complete, until the server's stdout ends (paced)."""
        while True:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                # The end of stdout is not the container's: a server may close it and live
                # on. The attach stream ends with the container (its last stderr with it);
                # until then nothing more is said, as on the attach socket, and nobody asks
                # the engine how a container that is still running ended.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._stderr)
                return
            owed = max(1, data.count(b"\n"))
            for handled, out in enumerate(self._stdout.feed(data), start=1):
                yield out
                if handled % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a turn for everyone else (charged)
            wait = self.pace.charge(owed, len(data))
            if wait or self._reader.buffered():  # else the next read waits: others' turn
                await asyncio.sleep(wait)

    async def close(self) -> None:
        self._stderr.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._stderr
        self._writer.close()
        self._read_transport.close()
        with contextlib.suppress(OSError):
            os.close(self._keeper)
        await self._attached.close()

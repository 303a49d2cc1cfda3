"""The audit log's fsyncs, on one thread of their own, in groups.

Why not `asyncio.to_thread(os.fsync, fd)` per sync: every call goes through the default
executor (a work item, a context copy, two chained futures, a thread pool's locks), which
py-spy put at ~6 % of the daemon on the HTTP path, where the group commit runs about a
hundred times a second. And durable records that arrive together (a burst of sessions
opening) each paid a whole fsync of their own.

Here the event loop asks (`fsync`) and gets a future; every ask made before the thread has
begun the next fsync shares it: one fsync makes all of them durable, since each ask came
after its own write. An ask made while an fsync is under way waits for the next one (its
write may have missed the one running).

The file is the log's *current* file (`current_fd`, read under `lock`): the log takes
`lock` to swap files when it rotates, having fsynced the old one itself, so an fsync never
meets a descriptor closed under it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable


class Fsyncer:
    """fsyncs of the current audit file, for one event loop, by one thread."""

    def __init__(self, current_fd: Callable[[], int]) -> None:
        self.lock = threading.Lock()  # held while the file is fsynced, and to swap it
        self._current_fd = current_fd
        self._asked = threading.Condition()
        self._next: list[asyncio.Future[None]] = []  # asks the next fsync will answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.done = 0  # fsyncs made (each may have served many asks)

    def fsync(self) -> asyncio.Future[None]:
        """Resolves once everything written before this call is on disk (or with the
        OSError of the fsync). The caller's own future: cancelling it cancels no other."""
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        with self._asked:
            if self._stopping:  # the log is closed: as an fsync of its closed file would
                mine.set_exception(OSError(errno.EBADF, "the audit log is closed"))
                return mine
            if not self._next:
                self._loop = loop
                self._asked.notify()
            self._next.append(mine)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stockade-audit-fsync", daemon=True
                )
                self._thread.start()
        return mine

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread once the fsync under way (and any asked for) is done."""
        with self._asked:
            self._stopping = True
            self._asked.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._asked:
                while not self._next and not self._stopping:
                    self._asked.wait()
                if not self._next:
                    return
                batch, loop, self._next = self._next, self._loop, []
            error: OSError | None = None
            try:
                with self.lock:
                    os.fsync(self._current_fd())
            except OSError as exc:
                error = exc
            self.done += 1
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(_settle, batch, error)
                except RuntimeError:  # the loop has closed: nobody waits any more
                    return


def _settle(batch: list[asyncio.Future[None]], error: OSError | None) -> None:
    for waiter in batch:
        if waiter.done():  # cancelled: its caller went away
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

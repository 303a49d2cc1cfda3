"""The policy in force: loaded at start, reloaded on SIGHUP or when a file changes.

A broken file at start stops the daemon (there is no last good policy to keep). A broken
file on reload is refused, said in the log with file and line, and the last good policy
keeps applying. With no policy file at all, everything is denied (and the log says so).
"""

from __future__ import annotations

from pathlib import Path

from stockade.logs import get_logger
from stockade.policy.evaluator import Evaluator
from stockade.policy.loader import Policy, PolicyError, load_policy
from stockade.policy.ratelimit import RateLimiter

log = get_logger("stockade.policy")


class PolicyStore:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fingerprint = self._scan()
        self.evaluator = Evaluator(self._load())
        self.limiter = RateLimiter()  # outlives reloads: a reload is no fresh burst
        self.last_error: str | None = None

    @property
    def directory(self) -> Path:
        return self._directory

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and mtimes of the policy files: a change means a reload."""
        if not self._directory.is_dir():
            return ()
        return tuple(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(self._directory.glob("*.yaml"))
        )

    def _load(self) -> Policy:
        if not self._directory.is_dir() or not any(self._directory.glob("*.yaml")):
            log.warning("no policy files: every request is denied", directory=str(self._directory))
            return Policy()
        policy = load_policy([self._directory])
        log.info("policy loaded", files=list(policy.files), rules=len(policy.rules))
        return policy

    def reload(self) -> bool:
        """Load the files again; on error keep the policy in force. True when it changed."""
        self._fingerprint = self._scan()
        try:
            policy = self._load()
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy refused; the last good policy still applies", error=str(exc))
            return False
        self.evaluator = Evaluator(policy)
        self.last_error = None
        return True

    def reload_if_changed(self) -> bool:
        if self._scan() == self._fingerprint:
            return False
        return self.reload()


__all__ = ["PolicyError", "PolicyStore"]

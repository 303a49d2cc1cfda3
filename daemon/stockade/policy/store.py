"""The policy in force: loaded at start, reloaded on SIGHUP or when a file changes.

A broken file at start stops the daemon (there is no last good policy to keep). A broken
file on reload is refused, said in the log with file and line, and the last good policy
keeps applying. With no policy file at all, everything is denied (and the log says so).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from stockade.audit.log import AuditLog, AuditUnavailable
from stockade.logs import get_logger
from stockade.policy.evaluator import Evaluator
from stockade.policy.loader import Policy, PolicyError, load_policy, policy_files
from stockade.policy.ratelimit import RateLimiter
from stockade.policy.sandbox import SandboxPolicy

log = get_logger("stockade.policy")


class PolicyStore:
    def __init__(self, directory: Path, audit: AuditLog | None = None) -> None:
        self._directory = directory
        self.ignored: tuple[str, ...] = ()  # entries of the folder that are not policy files
        self._audit = audit  # None only for offline use (the CLI); the daemon always audits
        self._fingerprint = self._scan()
        self.evaluator = Evaluator(self._load())
        self._record("policy.load", "ok", None, self.evaluator.policy)
        self.limiter = RateLimiter()  # outlives reloads: a reload is no fresh burst
        self.last_error: str | None = None

    @property
    def directory(self) -> Path:
        return self._directory

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and mtimes of the folder's entries: a change means a reload.

        Every entry counts, not only policy files: a file added under a name the loader
        does not take is reported on the reload it causes.
        """
        if not self._directory.is_dir():
            return ()
        try:
            entries = sorted(self._directory.iterdir())
            return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in entries)
        except OSError:
            return ((str(self._directory), -1, -1),)  # unreadable now: try again on reload

    def _load(self) -> Policy:
        files, others = policy_files(self._directory) if self._directory.is_dir() else ([], [])
        self.ignored = tuple(str(p) for p in others)
        for name in self.ignored:
            log.warning("not a policy file (only *.yaml and *.yml are loaded); ignored", path=name)
        if not files:
            log.warning("no policy files: every request is denied", directory=str(self._directory))
            return Policy(ignored=self.ignored)
        policy = load_policy([self._directory])
        log.info(
            "policy loaded",
            files=list(policy.files),
            rules=len(policy.rules),
            sandboxes=sorted(policy.sandboxes),
        )
        for server, sandbox in sorted(policy.sandboxes.items()):
            if sandbox.capabilities:  # loud on purpose: each one widens the sandbox
                log.warning(
                    "policy grants Linux capabilities",
                    server=server,
                    capabilities=list(sandbox.capabilities),
                    source=sandbox.source,
                )
        return policy

    def sandbox(self, server: str) -> SandboxPolicy:
        """How `server`'s containers must run under the policy in force."""
        return self.evaluator.policy.sandbox(server)

    def reload(self) -> bool:
        """Load the files again; on error keep the policy in force. True when it changed."""
        self._fingerprint = self._scan()
        try:
            policy = self._load()
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy refused; the last good policy still applies", error=str(exc))
            self._record("policy.refused", "error", str(exc))
            return False
        self.evaluator = Evaluator(policy)
        self.last_error = None
        self._record("policy.load", "ok", None, policy)
        return True

    def _record(
        self, event: str, outcome: str, reason: str | None, policy: Policy | None = None
    ) -> None:
        if self._audit is None:
            return
        detail = None
        if policy is not None:
            detail = {"files": list(policy.files), "rules": len(policy.rules)}
            if policy.ignored:
                detail["ignored"] = list(policy.ignored)
        with contextlib.suppress(AuditUnavailable):  # the failure is said and refuses traffic
            self._audit.write(event, outcome=outcome, reason=reason, detail=detail)

    def reload_if_changed(self) -> bool:
        if self._scan() == self._fingerprint:
            return False
        return self.reload()


__all__ = ["PolicyError", "PolicyStore"]

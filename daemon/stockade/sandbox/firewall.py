"""Host firewall rules that confine an egress network to its forwarders.

Docker gives the bridge of an `--internal` network an address, and the host answers on all
of its addresses (moby #47356, #47481): without these rules a sandbox reaches any host
service listening on 0.0.0.0 through its gateway, 172.17.0.1 or the host's own address.
Per egress network (bridge `BR`), the daemon installs, before any sandbox joins it:

- `INPUT -i BR -j DROP` (IPv4, and IPv6 where the host has it): nothing on the network
  reaches the host, on any address. Sandboxes need nothing from the host: the embedded DNS
  answers inside their own network namespace.
- The network is created with ICC off, so Docker drops bridge-internal traffic
  (`FORWARD -i BR -o BR -j DROP`); `DOCKER-USER` then accepts only TCP to each forwarder
  and the forwarder's established replies. One instance cannot reach another; a missing
  accept rule breaks egress, it never opens it.

Rules go into the iptables backend that holds Docker's own chains (legacy or nft), carry
the comment `stockade-egress/<daemon>/<key>`, and are installed idempotently (checked
with `-C` first) and removed by that comment: when the gateway goes, and for keys with no
gateway left at prune (after a crash). If a rule cannot be installed, `FirewallError`: the
gateway is torn down and the server is not started (fail closed).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stockade.logs import get_logger
from stockade.sandbox.errors import SandboxError

log = get_logger("stockade.firewall")

COMMENT_PREFIX = "stockade-egress"
IPTABLES_TIMEOUT_SECONDS = 20.0
# Docker drives whichever `iptables` is first on PATH; its chains tell us which that was.
V4_CANDIDATES = ("iptables", "iptables-nft", "iptables-legacy")
V6_CANDIDATES = ("ip6tables", "ip6tables-nft", "ip6tables-legacy")


class FirewallError(SandboxError):
    """A host firewall rule could not be read, installed or removed."""


@dataclass(frozen=True)
class Rule:
    binary: str
    chain: str
    spec: tuple[str, ...]  # match and target, with the comment


def _run(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(  # a fixed binary, with arguments we built
            [binary, "-w", "5", *args],
            capture_output=True,
            text=True,
            timeout=IPTABLES_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{binary} failed: {exc}") from None


def _has_docker_user(binary: str) -> bool:
    return shutil.which(binary) is not None and _run(binary, "-S", "DOCKER-USER").returncode == 0


class EgressFirewall:
    """Installs and removes one daemon's egress rules. Synchronous (runs `iptables`)."""

    def __init__(self, daemon_id: str) -> None:
        self._tag = f"{COMMENT_PREFIX}/{daemon_id[:8]}/"
        self._v4: str | None = None
        self._v6: str | None = None
        self._chosen = False

    def _binaries(self) -> tuple[str, str | None]:
        """(iptables, ip6tables or None when the host has no IPv6), chosen once."""
        if not self._chosen:
            self._v4 = next((b for b in V4_CANDIDATES if _has_docker_user(b)), None)
            if self._v4 is not None and Path("/proc/net/if_inet6").exists():
                self._v6 = next((b for b in V6_CANDIDATES if shutil.which(b)), None)
                if self._v6 is None:
                    raise FirewallError("the host has IPv6 but no ip6tables")
            self._chosen = self._v4 is not None
        if self._v4 is None:
            raise FirewallError(
                "no iptables with Docker's DOCKER-USER chain: the daemon needs root (or "
                "CAP_NET_ADMIN) and the engine's iptables backend to confine egress networks"
            )
        return self._v4, self._v6

    def confine(self, key: str, bridge: str) -> None:
        """Drop everything from `bridge` to the host. Before any sandbox joins the network."""
        v4, v6 = self._binaries()
        rules = [self._input(v4, key, bridge)]
        if v6 is not None:
            rules.append(self._input(v6, key, bridge))
        for rule in rules:
            self._ensure(rule)

    def allow_forwarders(self, key: str, bridge: str, forwarders: list[str]) -> None:
        """Accept sandbox -> forwarder TCP on `bridge`, and only that; stale accepts go."""
        v4, _ = self._binaries()
        comment = ("-m", "comment", "--comment", self._tag + key)
        wanted = []
        for address in sorted(set(forwarders)):
            to = ("-i", bridge, "-o", bridge, "-d", f"{address}/32", "-p", "tcp")
            back = ("-i", bridge, "-o", bridge, "-s", f"{address}/32", "-p", "tcp")
            established = ("-m", "conntrack", "--ctstate", "ESTABLISHED")
            wanted.append(Rule(v4, "DOCKER-USER", (*to, *comment, "-j", "ACCEPT")))
            wanted.append(Rule(v4, "DOCKER-USER", (*back, *established, *comment, "-j", "ACCEPT")))
        for rule in wanted:
            self._ensure(rule)
        current = {f"{address}/32" for address in forwarders}
        for rule in self._tagged(v4, "DOCKER-USER", {key}):
            if not current & set(rule.spec):  # a forwarder that is gone (restarted elsewhere)
                self._delete(rule)

    def release(self, keys: set[str]) -> int:
        """Remove every rule of this daemon for `keys`; how many went."""
        rules = self._all(keys)
        for rule in rules:
            self._delete(rule)
        return len(rules)

    def keys(self) -> set[str]:
        """Keys this daemon has rules for (to sweep those whose gateway is gone)."""
        found: set[str] = set()
        for rule in self._all(None):
            found.add(self._key_of(rule) or "")
        found.discard("")
        return found

    # -- internals ----------------------------------------------------------------------

    def _input(self, binary: str, key: str, bridge: str) -> Rule:
        comment = ("-m", "comment", "--comment", self._tag + key)
        return Rule(binary, "INPUT", ("-i", bridge, *comment, "-j", "DROP"))

    def _ensure(self, rule: Rule) -> None:
        if _run(rule.binary, "-C", rule.chain, *rule.spec).returncode == 0:
            return
        result = _run(rule.binary, "-I", rule.chain, "1", *rule.spec)
        if result.returncode != 0:
            raise FirewallError(
                f"could not add the {rule.chain} rule confining an egress network "
                f"({rule.binary}): {result.stderr.strip() or result.returncode}"
            )
        log.info("firewall rule added", chain=rule.chain, rule=shlex.join(rule.spec))

    def _delete(self, rule: Rule) -> None:
        result = _run(rule.binary, "-D", rule.chain, *rule.spec)
        if (
            result.returncode != 0
            and _run(rule.binary, "-C", rule.chain, *rule.spec).returncode == 0
        ):
            raise FirewallError(f"could not remove a {rule.chain} rule: {result.stderr.strip()}")
        log.info("firewall rule removed", chain=rule.chain, rule=shlex.join(rule.spec))

    def _all(self, keys: set[str] | None) -> list[Rule]:
        v4, v6 = self._binaries()
        rules = self._tagged(v4, "INPUT", keys) + self._tagged(v4, "DOCKER-USER", keys)
        if v6 is not None:
            rules += self._tagged(v6, "INPUT", keys)
        return rules

    def _tagged(self, binary: str, chain: str, keys: set[str] | None) -> list[Rule]:
        """This daemon's rules in `chain` (for `keys`, or all), as `iptables -S` lists them."""
        result = _run(binary, "-S", chain)
        if result.returncode != 0:
            raise FirewallError(f"could not list {chain} ({binary}): {result.stderr.strip()}")
        rules = []
        for line in result.stdout.splitlines():
            words = shlex.split(line)
            if words[:2] != ["-A", chain]:
                continue
            rule = Rule(binary, chain, tuple(words[2:]))
            key = self._key_of(rule)
            if key is not None and (keys is None or key in keys):
                rules.append(rule)
        return rules

    def _key_of(self, rule: Rule) -> str | None:
        for word in rule.spec:
            if word.startswith(self._tag):
                return word[len(self._tag) :]
        return None

"""Stockade's egress forwarder: relays TCP from a sandbox's internal network to one host.

Why our own and not haproxy, squid or tinyproxy: the guard must run at *every* connection,
after resolving the allowed name afresh, and refuse private, loopback, link-local and
cloud-metadata addresses (SSRF and DNS rebinding) unless an address is explicitly allowed.
haproxy resolves at start or on a timer and has no such address filter; squid and tinyproxy
cover HTTP CONNECT only, not plain TCP to a database port. The job is ~150 lines of asyncio
that we can read whole; TLS stays end to end (bytes are relayed, never inspected).

    forwarder.py --target api.github.com --ports 443 --clients 172.30.0.0/16 \
                 [--allow-address 10.0.0.5/32 ...]

Every decision is one JSON line on stderr; the first line on stdout is `ready`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Callable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses cloud providers answer instance metadata (and credentials) on. Most are already
# non-global; they are listed so the refusal names them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
CONNECT_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 256
CHUNK = 64 * 1024


def log(event: str, **fields: object) -> None:
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(record, sort_keys=True), file=sys.stderr, flush=True)


# Checked in order; the first that holds names the refusal.
REFUSED: tuple[tuple[str, Callable[[Address], bool]], ...] = (
    ("cloud metadata address", lambda a: a in METADATA_ADDRESSES),
    ("loopback address", lambda a: a.is_loopback),
    ("link-local address", lambda a: a.is_link_local),
    ("private address", lambda a: a.is_private),
    ("non-global address", lambda a: not a.is_global),
)


def refusal(address: Address, allowed: tuple[Network, ...]) -> str | None:
    """Why connecting to `address` is refused, or None when it is allowed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allowed):
        return None
    return next((reason for reason, holds in REFUSED if holds(address)), None)


class Forwarder:
    def __init__(self, target: str, clients: Network, allowed: tuple[Network, ...]) -> None:
        self.target = target
        self.clients = clients
        self.allowed = allowed
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        port = writer.get_extra_info("sockname")[1]
        where = {"client": peer[0], "target": f"{self.target}:{port}"}
        try:
            if ipaddress.ip_address(peer[0]) not in self.clients:
                log("refused", reason="client is not on the sandbox network", **where)
                return
            async with self.slots:
                upstream = await self._connect(port, where)
                if upstream is not None:
                    await self._relay(reader, writer, *upstream)
        finally:
            writer.close()

    async def _connect(
        self, port: int, where: dict[str, object]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        loop = asyncio.get_running_loop()
        try:  # resolved at every connection: a name that changes is checked again
            infos = await loop.getaddrinfo(self.target, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            log("refused", reason=f"cannot resolve: {exc.strerror}", **where)
            return None
        reasons: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0])
            why = refusal(address, self.allowed)
            if why is not None:
                reasons.append(f"{address}: {why}")
                continue
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(str(address), port), CONNECT_TIMEOUT_SECONDS
                )
            except (OSError, TimeoutError) as exc:
                reasons.append(f"{address}: {exc.__class__.__name__}")
                continue
            log("connected", address=str(address), **where)
            return upstream
        log("refused", reason="; ".join(reasons) or "no address", **where)
        return None

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(CHUNK):
                    sink.write(data)
                    await sink.drain()
                if sink.can_write_eof():
                    sink.write_eof()
            except OSError:
                sink.close()

        try:
            await asyncio.gather(
                pump(client_reader, upstream_writer), pump(upstream_reader, client_writer)
            )
        finally:
            upstream_writer.close()


async def serve(args: argparse.Namespace) -> None:
    forwarder = Forwarder(
        args.target.lower(),
        ipaddress.ip_network(args.clients, strict=False),
        tuple(ipaddress.ip_network(a, strict=False) for a in args.allow_address),
    )
    servers = [
        await asyncio.start_server(forwarder.handle, host="0.0.0.0", port=port)  # noqa: S104
        for port in args.ports
    ]
    log("listening", target=forwarder.target, ports=args.ports, clients=args.clients)
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--ports", required=True, type=lambda v: [int(p) for p in v.split(",")], help="443,8080"
    )
    parser.add_argument("--clients", required=True, help="the sandbox network's CIDR")
    parser.add_argument("--allow-address", action="append", default=[])
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

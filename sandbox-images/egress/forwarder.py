"""Stockade's egress forwarder: relays TCP from a sandbox's internal network to one host.

Why our own and not haproxy, squid or tinyproxy: the guard must run at *every* connection,
after resolving the allowed name afresh, and refuse private, loopback, link-local and
cloud-metadata addresses (SSRF and DNS rebinding) unless an address is explicitly allowed.
IPv6 forms that carry an IPv4 address (NAT64, 6to4, Teredo, IPv4-mapped/-compatible/
-translated, ISATAP) are judged by the IPv4 address they carry.
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


# IPv6 forms that carry an IPv4 address: a connection to them reaches that IPv4 address
# (through a translator, a tunnel or the dual stack), so that address is what is checked.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: prefix length unknown
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (but :: and ::1)
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # interface id ::0:5efe:a.b.c.d, u/l bit either way


def carried_ipv4(address: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses `address` carries, each with the name of its form."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    carried: list[tuple[str, ipaddress.IPv4Address]] = []
    if address.ipv4_mapped is not None:
        carried.append(("IPv4-mapped", address.ipv4_mapped))
    if address in IPV4_TRANSLATED:
        carried.append(("IPv4-translated", low32))
    if address in NAT64_WELL_KNOWN:
        carried.append(("NAT64", low32))
    if address in IPV4_COMPATIBLE and int(address) > 1:
        carried.append(("IPv4-compatible", low32))
    if address.sixtofour is not None:
        carried.append(("6to4", address.sixtofour))
    if address.teredo is not None:  # (server, client); the client's bits come inverted
        carried += [("Teredo server", address.teredo[0]), ("Teredo client", address.teredo[1])]
    if (int(address) >> 32) & 0xFFFFFFFF in ISATAP_IDS:
        carried.append(("ISATAP", low32))
    return carried


def classify(address: Address) -> str | None:
    """Why `address` itself is refused, or None when it is a global, ordinary address."""
    return next((reason for reason, holds in REFUSED if holds(address)), None)


def refusal(address: Address, allowed: tuple[Network, ...]) -> str | None:
    """Why connecting to `address` is refused, or None when it is allowed.

    An IPv6 address that carries an IPv4 one is judged by what it carries (every carried
    address must pass); `allowed` may list either the IPv6 address or the carried one.
    An ISATAP interface id can sit in any prefix, so there the IPv6 address must pass too.
    """
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL_USE:
            return "local-use NAT64 address (the IPv4 address it carries is not known)"
        carried = carried_ipv4(address)
        for form, inner in carried:
            if any(inner in network for network in allowed):
                continue
            why = classify(inner)
            if why is not None:
                return f"{why} in {form} form ({inner})"
        if any(form != "ISATAP" for form, _ in carried):
            return None
    return classify(address)


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

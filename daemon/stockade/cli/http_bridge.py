"""`stockade connect NAME --listen 127.0.0.1:PORT`: a local plain-HTTP door to one server.

For hosts that speak Streamable HTTP but can present neither a client certificate nor a
header (test suites, some IDEs). The bridge listens on loopback only, checks `Host` and
`Origin` (DNS-rebinding protection: both must name the loopback), and re-sends each request
to the daemon's HTTPS front with this host's client certificate, streaming the answer back.
It is the HTTP twin of the stdio bridge: same credentials, same policy, same audit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, web

FORWARDED_REQUEST_HEADERS = (
    "Accept",
    "Content-Type",
    "Mcp-Session-Id",
    "Last-Event-ID",
    "MCP-Protocol-Version",
)
FORWARDED_ANSWER_HEADERS = ("Content-Type", "Mcp-Session-Id", "Cache-Control")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


class BridgeError(Exception):
    """The bridge cannot start as asked."""


def _is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(value: str) -> str:
    """The host part of a Host header or an Origin (without port or scheme)."""
    netloc = urlsplit(value).netloc if "://" in value else value
    if netloc.startswith("["):
        return netloc.split("]")[0] + "]"
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class HttpBridge:
    def __init__(self, target: str, cert: Path, key: Path, ca: Path) -> None:
        self._target = target
        self._tls = ssl.create_default_context(cafile=str(ca))
        self._tls.load_cert_chain(cert, key)
        self._client: ClientSession | None = None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        for header in ("Host", "Origin"):
            value = request.headers.get(header)
            if value is not None and not _is_loopback(_host_of(value)):
                raise web.HTTPForbidden(text=f"{header} {value!r} is not the loopback")
        assert self._client is not None  # noqa: S101 - set in serve()
        headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
        async with self._client.request(
            request.method,
            self._target,
            data=await request.read() if request.can_read_body else None,
            headers=headers,
            ssl=self._tls,
        ) as upstream:
            answer = web.StreamResponse(
                status=upstream.status,
                headers={
                    h: upstream.headers[h]
                    for h in FORWARDED_ANSWER_HEADERS
                    if h in upstream.headers
                },
            )
            await answer.prepare(request)
            async for chunk in upstream.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    async def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        if not _is_loopback(host) or not port.isdigit():
            raise BridgeError("--listen takes a loopback HOST:PORT, e.g. 127.0.0.1:8931")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/mcp", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._client = ClientSession(timeout=ClientTimeout(total=None, sock_read=None))
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            await asyncio.Event().wait()  # until interrupted
        finally:
            await self._client.close()
            await runner.cleanup()

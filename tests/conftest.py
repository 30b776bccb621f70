"""In-process fixtures: the real create_app in front of a recording echo upstream."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.audit import AuditLog
from gateway.gateway import Gateway
from gateway.http.server import Server
from gateway.process import limits_of, raise_fd_limit
from gateway.settings import Settings
from tests.helpers import policy_doc, write_policy


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """In-process tests run on uvloop, the loop the gateway runs on."""
    return {"uvloop": uvloop.new_event_loop}


TEST_ROLE = {
    "description": "test-only: everything under /test",
    "allow": [{"methods": ["*"], "paths": ["/test/**"]}],
}
EXTRA_USERS = {"tester": ("testerpw", ["tester"]), "colon": ("pa:ss:word", ["sales"])}


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    server: TestServer
    seen: list[Seen] = field(default_factory=list, repr=False)
    events: dict[str, asyncio.Event] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def make_upstream_app(up: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        if path.startswith("/test/slow"):
            await asyncio.sleep(5)  # simulates a slow upstream (not synchronization)
        if path.startswith("/test/upload"):
            # Count what arrives before the client finished sending: proves streaming.
            total = 0
            first = True
            async for chunk in request.content.iter_chunked(65536):
                total += len(chunk)
                if first:
                    first = False
                    up.events.setdefault("upload_started", asyncio.Event()).set()
            up.seen.append(
                Seen(
                    request.method, path, dict(request.headers), list(request.headers.items()), b""
                )
            )
            return web.json_response({"received": total})
        if path.startswith("/test/download"):
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            await resp.write(b"x" * 65536)
            await up.events.setdefault("client_got_first", asyncio.Event()).wait()
            for _ in range(63):
                await resp.write(b"y" * 65536)
            await resp.write_eof()
            return resp
        body = await request.read()
        up.seen.append(
            Seen(request.method, path, dict(request.headers), list(request.headers.items()), body)
        )
        return web.json_response(
            {"method": request.method, "path": path, "body_len": len(body)},
            headers={
                "Connection": "keep-alive, X-Upstream-Secret",
                "X-Upstream-Secret": "hop",
                "Keep-Alive": "timeout=5",
                "X-Upstream": "yes",
            },
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    up = Upstream(server=None)  # type: ignore[arg-type]
    up.server = await aiohttp_server(make_upstream_app(up))
    return up


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "rbac.yaml", policy_doc(EXTRA_USERS, {"tester": TEST_ROLE}))


@pytest.fixture
def settings(policy_path: Path, upstream: Upstream) -> Settings:
    return Settings(
        policy=policy_path,
        upstream=upstream.url,
        watch=False,
        audit_log="off",
        handle_signals=False,
        upstream_timeout=1.0,
        connect_timeout=1.0,
        throttle_delay=0.0,
    )


class GatewayClient:
    """A real gateway (the :class:`Gateway` object on its own HTTP server, 127.0.0.1, an
    ephemeral port) and an aiohttp client session pointed at it; the interface tests use is
    the one of aiohttp's ``TestClient`` (``get``, ``post``, ... return responses)."""

    def __init__(self, gw: Gateway, server: Server, host: str, port: int) -> None:
        self.gw = gw
        self.server = server
        self.host = host
        self.port = port
        self.session = ClientSession(base_url=f"http://{host}:{port}", auto_decompress=False)

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.host}:{self.port}").join(URL(path))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.session.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Any:
        return self.request("HEAD", path, **kwargs)

    def options(self, path: str, **kwargs: Any) -> Any:
        return self.request("OPTIONS", path, **kwargs)

    async def close(self) -> None:
        await self.session.close()
        await self.server.shutdown(1.0)
        await self.gw.close()


async def start_gateway(
    settings: Settings, *, audit: AuditLog | None = None, **overrides: Any
) -> GatewayClient:
    """Build, start and serve a gateway in this event loop."""
    s = replace(settings, **overrides)
    gw = Gateway(s, audit=audit)
    await gw.start()
    server = gw.make_server(limits_of(s, raise_fd_limit()))
    host, port = await server.listen("127.0.0.1", 0)
    return GatewayClient(gw, server, host, port)


@pytest.fixture
async def make_gateway(
    settings: Settings,
) -> AsyncIterator[Callable[..., Awaitable[GatewayClient]]]:
    made: list[GatewayClient] = []

    async def make(*, audit: AuditLog | None = None, **overrides: Any) -> GatewayClient:
        client = await start_gateway(settings, audit=audit, **overrides)
        made.append(client)
        return client

    yield make
    for c in made:
        await c.close()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[GatewayClient]]) -> GatewayClient:
    return await make_gateway()


def error_of(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) >= {"error", "status"}, doc
    return doc


@dataclass
class RawGateway:
    client: GatewayClient
    upstream: Upstream

    @property
    def gw(self) -> Gateway:
        return self.client.gw

    @property
    def host(self) -> str:
        return self.client.host

    @property
    def port(self) -> int:
        return self.client.port

    async def send(self, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes (no client-side normalisation); return status, headers, body."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(data)
            await writer.drain()
            raw = await asyncio.wait_for(_read_response(reader), timeout)
        finally:
            writer.close()
        return raw


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return status, headers, body


@pytest.fixture
async def make_raw_gateway(
    settings: Settings, upstream: Upstream, make_gateway: Callable[..., Awaitable[GatewayClient]]
) -> Callable[..., Awaitable[RawGateway]]:
    async def make(**overrides: Any) -> RawGateway:
        return RawGateway(await make_gateway(**overrides), upstream)

    return make


@pytest.fixture
async def raw_gateway(make_raw_gateway) -> RawGateway:
    return await make_raw_gateway()


def raw_get(
    target: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: gateway.test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
async def decider(make_gateway):
    """A decision-mode gateway (proxies on 127.0.0.0/8 trusted) whose audit lines land in
    ``decider.audit_lines()``."""
    stream = io.StringIO()
    client = await make_gateway(
        mode="decide",
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        audit=AuditLog(stream),
    )
    client.audit_lines = lambda: [json.loads(x) for x in stream.getvalue().splitlines()]
    return client

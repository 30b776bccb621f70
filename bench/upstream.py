"""Fallback fixed upstream when nginx is absent: 200 "ok" for any method and path.

    python -m bench.upstream --port PORT

Reads and discards request bodies. It is much slower than nginx, so through-gateway ratios
measured against it understate the gateway's own share of the cost; the run says so.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def ok(request: web.Request) -> web.Response:
    async for _ in request.content.iter_chunked(65536):
        pass
    return web.Response(text="ok")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", ok)
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=loop_factory() if loop_factory else None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A tiny upstream for the fault tests: answers every path with a small JSON document, after
``?delay=SECONDS`` when the query asks for it (a slow upstream on demand), and reads any
request body whole first.

    python -m tests.integration.slowupstream --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web


async def answer(request: web.Request) -> web.Response:
    body = await request.read()
    delay = request.query.get("delay")
    if delay:
        await asyncio.sleep(float(delay))  # the slowness under test, not synchronization
    return web.json_response(
        {"method": request.method, "path": request.path, "body_len": len(body)}
    )


async def main(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    print(f"slowupstream listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="slowupstream")
    p.add_argument("--port", type=int, default=0)
    asyncio.run(main(p.parse_args().port))

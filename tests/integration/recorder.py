"""A recording upstream for the decision-mode tests: every request it receives becomes one
JSON line (method, raw target, header list, body length) in ``--log``, written before it
answers, so a test that got its answer can read what arrived.

    python -m tests.integration.recorder --port 0 --log requests.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web


def make_app(log_path: str) -> web.Application:
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed on cleanup

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        line = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
        }
        log.write(json.dumps(line) + "\n")
        log.flush()
        return web.json_response({"recorded": True})

    async def close(app: web.Application) -> None:
        log.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    app.on_cleanup.append(close)
    return app


async def main(port: int, log_path: str) -> None:
    runner = web.AppRunner(make_app(log_path), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = runner.server
    assert server is not None
    bound = runner.addresses[0]
    print(f"recorder listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="recorder")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    asyncio.run(main(a.port, a.log))

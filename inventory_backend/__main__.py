"""Command line: ``python -m inventory_backend [--db PATH] [--host H] [--port N]``.

Each flag falls back to an environment variable (``INVENTORY_DB``, ``INVENTORY_HOST``,
``INVENTORY_PORT``, ``INVENTORY_LOG_LEVEL``), then to the default; flags win.

Once listening, the process writes one line per bound socket to stderr, whatever the log
level, for scripts and tests to find the port (``--port 0`` picks a free one)::

    inventory_backend listening on http://127.0.0.1:43127

SIGTERM or SIGINT stops it cleanly with exit status 0. A database that cannot be opened,
or an address that cannot be bound, is one line on stderr and exit status 1; bad flags
are argparse's usage error and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from .app import create_app
from .errors import StorageError

log = logging.getLogger(__name__)

PROG: Final = "inventory_backend"
LISTENING: Final = f"{PROG} listening on"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_SHUTDOWN_TIMEOUT: Final = 5.0  # seconds in-flight requests get to finish on stop


class _Failure(Exception):
    """A startup failure reported as one line on stderr and exit status 1."""


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Parse flags, filling the ones not given from ``environ``; exits 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description="Inventory REST service over SQLite."
    )
    parser.add_argument("--db", type=Path, help="SQLite file (env INVENTORY_DB; data/inventory.db)")
    parser.add_argument("--host", help="address to listen on (env INVENTORY_HOST; 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, help="TCP port, 0 for any free one (env INVENTORY_PORT; 8081)"
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        help="log verbosity (env INVENTORY_LOG_LEVEL; info)",
    )
    args = parser.parse_args(argv)
    if args.db is None:
        args.db = Path(environ.get("INVENTORY_DB") or "data/inventory.db")
    if args.host is None:
        args.host = environ.get("INVENTORY_HOST") or "127.0.0.1"
    if args.port is None:
        raw = environ.get("INVENTORY_PORT") or "8081"
        try:
            args.port = _port(raw)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"INVENTORY_PORT: {exc}")
    if args.log_level is None:
        args.log_level = (environ.get("INVENTORY_LOG_LEVEL") or "info").lower()
        if args.log_level not in _LOG_LEVELS:
            parser.error(f"INVENTORY_LOG_LEVEL: must be one of {', '.join(_LOG_LEVELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; return the exit status."""
    args = parse_args(argv, os.environ)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args.db, args.host, args.port))
    except (_Failure, StorageError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        pass
    return 0


async def _serve(db: Path, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(create_app(db), handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    try:
        await runner.setup()  # opens the database
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise _Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        for address in runner.addresses:
            print(f"{LISTENING} {_url(address)}", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _port(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5 and int(raw) <= 65535):
        raise argparse.ArgumentTypeError(f"invalid port {raw!r}: must be 0..65535")
    return int(raw)


if __name__ == "__main__":
    sys.exit(main())

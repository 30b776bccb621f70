"""Container health probe: exit 0 when a URL answers 200, else 1.

    python healthcheck.py [URL ...]

One script for both services (the image is shared). With URLs given (compose passes the one
of its service), or a comma-separated HEALTHCHECK_URL, the container is healthy when any of
them answers 200. Without either, it probes the gateway's /-/healthz on $GATEWAY_PORT and the
backend's /healthz on $INVENTORY_PORT: whichever service the container runs answers, and the
other port is closed, so one image-level HEALTHCHECK fits both.

Standard library only; proxies are ignored on purpose: the target is this container's own
loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def default_urls() -> list[str]:
    configured = os.environ.get("HEALTHCHECK_URL", "")
    if configured.strip():
        return [u.strip() for u in configured.split(",") if u.strip()]
    gateway = os.environ.get("GATEWAY_PORT", "8080")
    backend = os.environ.get("INVENTORY_PORT", "8081")
    return [f"http://127.0.0.1:{gateway}/-/healthz", f"http://127.0.0.1:{backend}/healthz"]


def probe(url: str, timeout: float = 2.0) -> bool:
    """True when one GET of ``url`` answers 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    urls = argv[1:] or default_urls()
    return 0 if any(probe(u) for u in urls) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

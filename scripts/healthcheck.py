"""Container health probe: exit 0 when URL answers 200, else 1.

    python healthcheck.py [URL]        # default: $HEALTHCHECK_URL

One script for both services (the image is shared): the gateway probes /-/healthz on 8080,
the backend /healthz on 8081 (set HEALTHCHECK_URL or pass the URL). Standard library only,
so the probe works in any image that has Python, and proxies are ignored on purpose: the
target is always this container's own loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/-/healthz"


def probe(url: str, timeout: float = 2.0) -> int:
    """Return the process exit status for one GET of ``url``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    return probe(url)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

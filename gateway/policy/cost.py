"""bcrypt cost: read it from a hash, and say what one check at a given cost takes here."""

from __future__ import annotations

import re
import time

import bcrypt

BCRYPT_HASH = re.compile(r"^\$2[aby]?\$(\d\d)\$[./A-Za-z0-9]{53}$")
RECOMMENDED = (10, 13)  # lint warns outside it; hash-password warns above it


def bcrypt_cost(password_hash: bytes | str) -> int:
    """The cost factor of a bcrypt hash (``$2b$12$…`` → 12); the loader validated its shape."""
    text = password_hash.decode() if isinstance(password_hash, bytes) else password_hash
    return int(text[4:6])


def check_seconds(cost: int) -> float:
    """CPU seconds one bcrypt check takes on this machine at ``cost``.

    Measured once at cost 4 and doubled per step (bcrypt's work is 2**cost), so estimating a
    cost of 20 takes a millisecond instead of a minute.
    """
    h = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4))
    t0 = time.process_time()
    bcrypt.checkpw(b"x", h)
    return (time.process_time() - t0) * 2.0 ** (cost - 4)

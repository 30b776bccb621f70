"""How the gateway keeps memory management off the request path.

**The cyclic collector and the policy.** A compiled 10,000-rule policy is ~200,000 objects the
collector tracks. Building one beside the serving loop (a reload, in an executor thread)
allocates so many that CPython's full collection ran six times during one load, 150-400 ms
each with the GIL held and nothing freed: the loop stalled for seconds per reload, and in
steady state every full collection rescanned the policy in force (120-190 ms). So a load runs
with the collector paused (:func:`collector_paused`; the policy is acyclic and the loader's
garbage is freed by reference counting), and once the process is up, and again after each
load, :func:`settle` moves every object alive to the permanent generation (``gc.freeze``)
so later collections skip them. A frozen object is still freed when its last reference goes:
the policy a swap replaces is, as long as it has no reference cycle (a test holds that).

**glibc's malloc.** Keep it from handing freed body buffers back to the kernel after every
request.

A streamed upload passes through a few short-lived buffers of its size (the bytes uvloop read,
the body chunk llhttp cut from them). With glibc's defaults, freeing them leaves more than the
trim threshold free at the top of the heap, so ``free`` shrinks the heap with ``brk`` and the
next request faults the same pages back in, zeroed: 14 page faults per 64 KiB upload, about a
third of the gateway's CPU per upload (``perf``: ``exc_page_fault`` and ``clear_page``
under the copy into the new buffer). Raising the trim threshold and fixing the mmap threshold
(``mallopt(3)``, the documented knobs behind ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_``) keeps up to ``TRIM_THRESHOLD`` of freed heap for reuse instead.

Only on glibc, and never over an operator's own ``MALLOC_*_`` settings (glibc read them at
start; they win). Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 16 * 1024 * 1024  # freed heap kept for reuse before it is returned
MMAP_THRESHOLD = 1 * 1024 * 1024  # larger allocations get their own mapping
OPERATOR_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str:
    """Apply the thresholds; return what was done, for the start-up log."""
    if platform.libc_ver()[0] != "glibc":
        return "malloc left as is (not glibc)"
    chosen = [k for k in OPERATOR_ENV if k in os.environ]
    if chosen:
        return f"malloc left to the environment ({', '.join(chosen)})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "malloc left as is (mallopt not found)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ):
        return "malloc left as is (mallopt refused)"
    return (
        f"malloc keeps up to {TRIM_THRESHOLD >> 20} MiB freed for reuse; "
        f"allocations over {MMAP_THRESHOLD >> 20} MiB are mapped"
    )


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (it is process-wide: keep the block short)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def settle() -> int:
    """Exempt every object alive now from later collections; return how many are exempt."""
    gc.freeze()
    return gc.get_freeze_count()

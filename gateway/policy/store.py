"""PolicyStore: the one mutable object. Holds the current compiled policy and swaps it.

Reload = read → parse → validate → compile → run the policy's tests → swap one reference, on
the event loop. Files identical to the ones in force (by digest) are not parsed again. Any failure keeps the last good policy and is recorded (log line, status,
metrics). A request takes one snapshot (``store.policy``) and is decided under it to the end.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError
from ..memory import collector_paused, settle
from .grants import describe_changes
from .load import load_policy
from .model import Policy, digest

log = logging.getLogger(__name__)

_RELOAD_SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005

SwapHook = Callable[[Policy], Awaitable[None]]
ResultHook = Callable[["ReloadResult"], None]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt: refused (``ok`` false, ``errors`` as ``FILE:LINE: key: message``),
    unchanged, or swapped in (``changed``, with ``changes``: what each user gains and loses).
    ``recovered``: this attempt cleared an earlier refusal."""

    ok: bool
    changed: bool
    sha256: str
    errors: tuple[str, ...] = ()
    trigger: str = ""
    changes: tuple[str, ...] = ()
    recovered: bool = False


@dataclass(slots=True)
class ReloadStats:
    """Counters for ``/-/status``; ``last_error`` is set while the last attempt was refused."""

    ok: int = 0
    failed: int = 0
    unchanged: int = 0
    recovered: int = 0
    last_error: str | None = None
    last_load_seconds: float = 0.0


class PolicyStore:
    """Holds the current :class:`Policy` of one process."""

    def __init__(self, path: str | Path, policy: Policy) -> None:
        self.path = Path(path)
        self._policy = policy
        self.loaded_at = time.time()
        self.stats = ReloadStats()
        self._lock = asyncio.Lock()
        self._hooks: list[SwapHook] = []
        self._listeners: list[ResultHook] = []

    @classmethod
    def open(cls, path: str | Path) -> PolicyStore:
        """Load the policy at ``path`` or raise :class:`PolicyError` (used at start)."""
        return cls(path, _load_quietly(Path(path)))

    @property
    def policy(self) -> Policy:
        """The policy in force now; take it once per request."""
        return self._policy

    def on_swap(self, hook: SwapHook) -> None:
        """Run ``hook(new_policy)`` before a new policy goes into force."""
        self._hooks.append(hook)

    def fingerprint(self) -> str:
        """sha256 of the files the current policy came from, as they are on disk now."""
        try:
            return digest([Path(name).read_bytes() for name in self._policy.files])
        except OSError:
            return "unreadable"

    def on_result(self, listener: ResultHook) -> None:
        """Call ``listener(result)`` after every reload attempt (metrics, status)."""
        self._listeners.append(listener)

    async def reload(self, trigger: str = "manual") -> ReloadResult:
        """Load the file again; swap only if it is valid, passes its tests and differs."""
        async with self._lock:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                on_disk = await loop.run_in_executor(None, self.fingerprint)
                if on_disk == self._policy.sha256:
                    new = self._policy  # the files in force, byte for byte: nothing to parse
                else:
                    new = await loop.run_in_executor(None, _load_quietly, self.path)
                    for hook in self._hooks:
                        await hook(new)
            except PolicyError as exc:
                errors = tuple(str(p) for p in exc.problems)
                self.stats.failed += 1
                self.stats.last_error = "\n".join(errors)
                log.warning(
                    "policy reload (%s) refused, keeping %s: %s",
                    trigger,
                    self._policy.sha256[:12],
                    "; ".join(errors),
                )
                result = ReloadResult(False, False, self._policy.sha256, errors, trigger)
                self._remember(result)
                return result
            self.stats.last_load_seconds = time.perf_counter() - started
            old = self._policy
            recovered = self.stats.last_error is not None
            self.stats.last_error = None
            if recovered:
                self.stats.recovered += 1
            if new.sha256 == old.sha256:
                self.stats.unchanged += 1
                if recovered:
                    log.info(
                        "policy reload (%s): the file is back to the policy in force (%s); "
                        "the earlier refusal is cleared",
                        trigger,
                        new.sha256[:12],
                    )
                result = ReloadResult(True, False, new.sha256, (), trigger, recovered=recovered)
                self._remember(result)
                return result
            # a matrix of users × routes for a big policy: off the loop, like the load
            changes = tuple(await loop.run_in_executor(None, _diff_quietly, old, new))
            self._policy = new
            self.loaded_at = time.time()
            self.stats.ok += 1
            log.info("policy reloaded (%s): %s -> %s", trigger, old.sha256[:12], new.sha256[:12])
            for line in changes:
                log.info("policy change: %s", line)
            for w in new.warnings:
                log.warning("%s", w)
            result = ReloadResult(True, True, new.sha256, (), trigger, changes, recovered)
            self._remember(result)
            return result

    def _remember(self, result: ReloadResult) -> None:
        for listener in self._listeners:
            listener(result)


@contextmanager
def _beside_the_loop() -> Iterator[None]:
    """For CPU-bound work in a thread next to the serving loop (a big policy's compile and diff).

    The collector is paused: hundreds of thousands of new objects would otherwise set off full
    collections, each holding the GIL for 150-400 ms. And the thread hands the GIL back every
    millisecond instead of every five: the loop waits for it after each poll, so a request
    crossing the loop a few times waited tens of milliseconds per reload (bench/reload.py: p99
    84 -> 32 ms with a 10,000-rule policy). Reloads are serialized by the store's lock.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, _RELOAD_SWITCH_INTERVAL))
    try:
        with collector_paused():
            yield
    finally:
        sys.setswitchinterval(interval)


def _load_quietly(path: Path) -> Policy:
    with _beside_the_loop():
        policy = load_policy(path)
        # Exempt it from collections before the collector runs again, or the next young-
        # generation collection walks all of it. Refused later, it is still freed: it has no
        # reference cycles.
        settle()
        return policy


def _diff_quietly(old: Policy, new: Policy) -> list[str]:
    with _beside_the_loop():
        return describe_changes(old, new)


async def watch(store: PolicyStore, interval: float = 1.0) -> None:
    """Reload whenever the policy's files change *by content*.

    Reading the file by name each time (never holding an inode or a watch on it) sees
    in-place writes, editors' rename-over saves, ``sed -i`` and Kubernetes' symlink swaps
    alike. A broken file is tried once per distinct content, not every tick.
    """
    last_failed: str | None = None
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        current = await loop.run_in_executor(None, store.fingerprint)
        if current == last_failed:
            continue
        if current == store.policy.sha256 and store.stats.last_error is None:
            continue
        # A new content, or the content in force again after a refused edit (a typo undone
        # by `git checkout`): reload, which clears the refusal and tells the listeners.
        result = await store.reload("watch")
        last_failed = None if result.ok else current

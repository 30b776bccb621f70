"""PolicyStore: the one mutable object. Holds the current compiled policy and swaps it.

Reload = read → parse → validate → compile → run the policy's tests → swap one reference, on
the event loop. Any failure keeps the last good policy and is recorded (log line, status,
metrics). A request takes one snapshot (``store.policy``) and is decided under it to the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..errors import PolicyError
from .load import load_policy
from .model import Policy, digest

log = logging.getLogger(__name__)

SwapHook = Callable[[Policy], Awaitable[None]]
ResultHook = Callable[["ReloadResult"], None]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    sha256: str
    errors: tuple[str, ...] = ()
    trigger: str = ""


@dataclass(slots=True)
class ReloadStats:
    ok: int = 0
    failed: int = 0
    unchanged: int = 0
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
        return cls(path, load_policy(path))

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
                new = await loop.run_in_executor(None, load_policy, self.path)
                for hook in self._hooks:
                    await hook(new)
            except PolicyError as exc:
                errors = tuple(str(p) for p in exc.problems)
                self.stats.failed += 1
                self.stats.last_error = "\n".join(errors)
                log.warning("policy reload (%s) refused, keeping %s: %s", trigger,
                            self._policy.sha256[:12], "; ".join(errors))
                result = ReloadResult(False, False, self._policy.sha256, errors, trigger)
                self._remember(result)
                return result
            self.stats.last_load_seconds = time.perf_counter() - started
            old = self._policy
            if new.sha256 == old.sha256:
                self.stats.unchanged += 1
                self.stats.last_error = None
                result = ReloadResult(True, False, new.sha256, (), trigger)
                self._remember(result)
                return result
            self._policy = new
            self.loaded_at = time.time()
            self.stats.ok += 1
            self.stats.last_error = None
            log.info("policy reloaded (%s): %s -> %s", trigger, old.sha256[:12], new.sha256[:12])
            for line in describe_changes(old, new):
                log.info("policy change: %s", line)
            for w in new.warnings:
                log.warning("%s", w)
            result = ReloadResult(True, True, new.sha256, (), trigger)
            self._remember(result)
            return result

    def _remember(self, result: ReloadResult) -> None:
        for listener in self._listeners:
            listener(result)


def describe_changes(old: Policy, new: Policy) -> list[str]:
    """Human lines: roles/users added and removed, per user the routes gained and lost."""
    out: list[str] = []
    for kind, a, b in (("role", old.roles, new.roles), ("user", old.users, new.users)):
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        if added:
            out.append(f"{kind}s added: {', '.join(added)}")
        if removed:
            out.append(f"{kind}s removed: {', '.join(removed)}")
    for name in sorted(set(old.users) & set(new.users)):
        before, after = _routes(old, name), _routes(new, name)
        gained, lost = sorted(after - before), sorted(before - after)
        if gained:
            out.append(f"user {name} gains: {'; '.join(gained)}")
        if lost:
            out.append(f"user {name} loses: {'; '.join(lost)}")
        if old.users[name].password_hash != new.users[name].password_hash:
            out.append(f"user {name}: password changed (cached credentials dropped)")
    return out


def _routes(policy: Policy, user: str) -> set[str]:
    return {f"{r.effect} {m} {p.text}" + (" (body-constrained)" if r.body_keys else "")
            for r in policy.rules_of(user) for m in sorted(r.methods) for p in r.patterns}


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
        if current == store.policy.sha256 or current == last_failed:
            continue
        result = await store.reload("watch")
        last_failed = None if result.ok else current

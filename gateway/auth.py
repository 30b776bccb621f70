"""Authentication: parse ``Authorization: Basic``, verify against bcrypt, cache, throttle.

* bcrypt runs in a small thread pool (it releases the GIL; ~200 ms at cost 12), never on the
  event loop, and at most ``max_inflight`` checks run or wait at once: beyond that new
  uncached checks get 503 at once instead of queueing without end.
* Parsing the header is ``credentials.py``'s. A successful check is cached under a keyed
  BLAKE2b of the raw header (and of the decoded credentials) together with the hash it was
  verified against; an entry whose user's hash changed on reload (or whose
  user vanished) is a miss, so a password change takes effect with the reload.
* Unknown users are checked against a dummy hash of the same cost: same status, body, timing.
* Failed attempts are throttled per client address and per address+user with exponential
  back-off (429 + Retry-After). Cached successes skip the throttle, so an attacker hammering an
  address cannot lock out users whose credentials are already known good.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import bcrypt

from .credentials import Credentials, is_canonical, parse_basic
from .errors import Overloaded, TooManyRequests, Unauthenticated
from .policy import Policy, User
from .throttle import FailureThrottle


class CredentialCache:
    """Verified credentials, bounded in size and age, stored under a keyed hash (keyed
    BLAKE2b, a MAC, with a per-process random key) of the ``Authorization`` value as it
    arrived, so a cached request is recognised without decoding it; never the password.
    An entry holds the user's name and the bcrypt hash it was verified against: a reload that
    changes the hash (or removes the user) makes it miss.

    An entry in the last tenth of its life is *due*: the next request that uses it is still
    served from the cache while the credentials are checked again in the background, so an
    active user never waits for bcrypt when the TTL runs out (that wait was the p99 spike the
    bench saw every ``ttl`` seconds)."""

    def __init__(self, ttl: float = 300.0, max_entries: int = 10_000) -> None:
        self._key = os.urandom(32)
        self._ttl = ttl
        self._refresh_before = ttl / 10
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, bytes, str]] = OrderedDict()
        self._refreshing: set[bytes] = set()
        self.hits = 0
        self.misses = 0

    def key(self, header: bytes) -> bytes:
        """The keyed hash an ``Authorization`` value is stored under."""
        return hashlib.blake2b(header, key=self._key, digest_size=16).digest()

    def key_of(self, creds: Credentials) -> bytes:
        """The key of decoded credentials (for callers without the raw header)."""
        return self.key(
            b"\0".join(
                (b"creds", creds.user.encode(), creds.password.encode("utf-8", "surrogatepass"))
            )
        )

    def lookup(self, key: bytes, policy: Policy, *, counted: bool = True) -> User | None:
        """The user ``key`` was verified as, if still valid under ``policy`` (``counted``:
        whether the hit/miss counters see this lookup)."""
        entry = self._entries.get(key)
        if entry is not None:
            user = policy.users.get(entry[2])
            if user is not None and user.password_hash == entry[1] and entry[0] > time.monotonic():
                self.hits += counted
                return user
        self.misses += counted
        return None

    def hit(self, key: bytes, policy: Policy) -> tuple[User | None, bool]:
        """:meth:`lookup` and :meth:`due` in one look (the per-request path): the user, or
        ``None`` when the credentials must be checked; and whether to check them again in
        the background now."""
        entry = self._entries.get(key)
        if entry is not None:
            user = policy.users.get(entry[2])
            left = entry[0] - time.monotonic()
            if user is not None and user.password_hash == entry[1] and left > 0:
                self.hits += 1
                return user, left < self._refresh_before and key not in self._refreshing
        self.misses += 1
        return None, False

    def fresh_until(self, key: bytes) -> float:
        """The monotonic time until which the entry needs no check (0.0 without one)."""
        entry = self._entries.get(key)
        return entry[0] - self._refresh_before if entry is not None else 0.0

    def due(self, key: bytes) -> bool:
        """True when the entry should be checked again now (and nobody is doing it yet)."""
        entry = self._entries.get(key)
        return (
            entry is not None
            and entry[0] - time.monotonic() < self._refresh_before
            and key not in self._refreshing
        )

    def refreshing(self, key: bytes, busy: bool) -> None:
        """Mark (or unmark) an entry whose background check is under way."""
        if busy:
            self._refreshing.add(key)
        else:
            self._refreshing.discard(key)

    def put(self, key: bytes, user: User) -> None:
        self._entries[key] = (time.monotonic() + self._ttl, user.password_hash, user.name)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def retain(self, policy: Policy) -> int:
        """Drop entries whose hash no user has any more; return how many were dropped."""
        live = {u.password_hash for u in policy.users.values()}
        stale = [k for k, (_, h, _u) in self._entries.items() if h not in live]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    """Turns a request's credentials into a :class:`User` of the current policy."""

    def __init__(
        self,
        *,
        max_inflight: int = 16,
        per_address_inflight: int = 2,
        threads: int | None = None,
        cache: CredentialCache | None = None,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self.cache = cache if cache is not None else CredentialCache()  # an empty one is falsy
        self.throttle = throttle if throttle is not None else FailureThrottle()
        self._pool = ThreadPoolExecutor(
            max_workers=threads or _default_threads(),
            thread_name_prefix="bcrypt",
            initializer=_lower_priority,
        )
        self._max_inflight = max_inflight
        self._inflight = 0
        self._dummies: dict[bytes, bytes] = {}
        self._common_prefix = b""
        self._flights: dict[tuple[bytes, bytes], asyncio.Future[bool]] = {}
        # Failures are only known once bcrypt has run; without this bound one client with
        # many connections gets max_inflight guesses checked before the throttle sees any.
        self._per_address_max = per_address_inflight
        self._per_address: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.bcrypt_checks = 0

    @property
    def inflight(self) -> int:
        """Password checks running or queued now."""
        return self._inflight

    def close(self) -> None:
        for task in self._background:
            task.cancel()
        self.throttle.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, policy: Policy) -> None:
        """Make a dummy hash for every cost the policy uses (unknown users cost the same)."""
        loop = asyncio.get_running_loop()
        for u in policy.users.values():
            prefix = u.password_hash[:7]  # b"$2b$12$"
            if prefix not in self._dummies:
                rounds = int(prefix[4:6])
                self._dummies[prefix] = await loop.run_in_executor(
                    self._pool, bcrypt.hashpw, os.urandom(16), bcrypt.gensalt(rounds=rounds)
                )
        costs = [u.password_hash[:7] for u in policy.users.values()]
        # the most common cost in the policy, so unknown users look like real ones
        self._common_prefix = max(set(costs), key=costs.count) if costs else b""
        self.cache.retain(policy)

    def refresh(self, policy: Policy, header: bytes, key: bytes, address: str) -> None:
        """Check a due entry's credentials again in the background (see CredentialCache)."""
        try:
            creds = parse_basic(header.decode("latin-1"), policy.realm)
        except Unauthenticated:
            return
        if creds is not None:
            self._start_refresh(policy, creds, key, address)

    def _start_refresh(self, policy: Policy, creds: Credentials, key: bytes, address: str) -> None:
        self.cache.refreshing(key, True)
        task = asyncio.get_running_loop().create_task(self._refresh(policy, creds, key, address))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, policy: Policy, creds: Credentials, key: bytes, address: str) -> None:
        try:
            user = policy.users.get(creds.user)
            if user is None:
                return
            creds_key = self.cache.key_of(creds)
            if await self._verify(creds_key, creds.password, user.password_hash, address):
                self.cache.put(creds_key, user)
                self.cache.put(key, user)
        except (Overloaded, TooManyRequests):
            pass  # busy: the entry simply expires and the next request checks it
        finally:
            self.cache.refreshing(key, False)

    async def authenticate(
        self,
        policy: Policy,
        creds: Credentials,
        address: str,
        key: bytes | None = None,
        *,
        remember_key: bool = True,
    ) -> User:
        """Return the user or raise 401 / 429 / 503; ``key`` is the cache key of the header
        the credentials came from (by default one is made from the credentials), remembered
        only with ``remember_key``: an odd spelling of verified credentials (``basic``, extra
        spaces) must not get entries of its own, or one user's endless spellings would push
        every other user out of the cache."""
        user = policy.users.get(creds.user)
        # The same credentials spelled another way (``basic``, other padding...) were maybe
        # verified already: one key for the decoded credentials too, so no bcrypt runs again.
        creds_key = self.cache.key_of(creds)
        # Counted when it is the only lookup (decision mode); proxy mode counted its raw key.
        cached = self.cache.lookup(creds_key, policy, counted=key is None)
        if cached is not None and cached is user:
            if key is not None:
                # proxy mode counted a miss on the raw header; no bcrypt ran: a hit after all
                self.cache.misses -= 1
                self.cache.hits += 1
            if key is not None and remember_key:
                self.cache.put(key, user)
            elif self.cache.due(creds_key):  # no raw-header key to refresh ahead: this one
                self._start_refresh(policy, creds, creds_key, address)
            return user
        key = key or creds_key
        self.throttle.check(address, creds.user)
        hashed = user.password_hash if user is not None else self._dummy(policy)
        ok = await self._verify(creds_key, creds.password, hashed, address, creds.user)
        if not ok or user is None:
            self.throttle.failed(address, creds.user)
            raise Unauthenticated(
                "invalid credentials", realm=policy.realm, code="invalid_credentials"
            )
        self.throttle.succeeded(address, creds.user)
        self.cache.put(creds_key, user)
        if key != creds_key and remember_key:
            self.cache.put(key, user)
        return user

    async def _verify(
        self, key: bytes, password: str, hashed: bytes, address: str, user: str | None = None
    ) -> bool:
        """One bcrypt check per distinct credential at a time: concurrent requests with the
        same credentials (a cold cache after start or reload) share the one in flight. The
        one that runs it asks the throttle first when ``user`` is given (a shared throttle
        asks the supervisor: every worker's failures, and a slot of the address's checks)."""
        flight = self._flights.get((key, hashed))
        if flight is not None:
            return await asyncio.shield(flight)
        if self._inflight >= self._max_inflight:
            raise Overloaded("too many password checks in progress; retry shortly")
        mine = self._per_address.get(address, 0)
        if mine >= self._per_address_max:
            raise TooManyRequests(
                "too many password checks in progress from this address", retry_after=1
            )
        loop = asyncio.get_running_loop()
        flight = self._flights[(key, hashed)] = loop.create_future()
        self._inflight += 1
        self._per_address[address] = mine + 1
        reservation = 0
        try:
            if user is not None:
                reservation = await self.throttle.admit(address, user, password)
            ok = await loop.run_in_executor(self._pool, _checkpw, password, hashed)
        except TooManyRequests as exc:  # those sharing the flight are refused alike
            flight.set_exception(exc)
            flight.exception()  # retrieved: nobody may be sharing it
            raise
        except BaseException:
            flight.cancel()
            raise
        finally:
            self.throttle.release(reservation)
            self._inflight -= 1
            del self._flights[(key, hashed)]
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]
        self.bcrypt_checks += 1
        flight.set_result(ok)
        return ok

    def _dummy(self, policy: Policy) -> bytes:
        return self._dummies.get(self._common_prefix, _FALLBACK_DUMMY)


def _default_threads() -> int:
    # Leave a core to the event loops: the flood of uncached checks must not starve them.
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _lower_priority() -> None:
    """Run bcrypt threads under ``SCHED_IDLE`` (Linux: per thread), else at nice +19, so that
    when a wrong-password flood meets a busy CPU the event loops serving cached users come
    first. ``SCHED_IDLE`` rather than nice alone: a nice-19 thread keeps its CPU for up to a
    scheduler slice (milliseconds) when a loop wakes, an idle-class one is preempted at once;
    it still gets a small share of a saturated CPU (it is not starved)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _checkpw(password: str, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password.encode("utf-8", "surrogatepass"), hashed)
    except ValueError:  # bcrypt refuses > 72-byte passwords and malformed hashes: no match
        return False


# Used only before prepare() ran: a cost-12 hash of a random string nobody knows.
_FALLBACK_DUMMY = b"$2b$12$rK2xBIkQ3M1w2esyvNtmZev8Yn1Ly1qEbYUdA4vtMuDKse9tFRUBi"


def client_behind_proxies(
    peer: str,
    forwarded: Iterable[str],
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> str:
    """The client a request is from: the right-most address in ``X-Forwarded-For`` that is
    not a trusted proxy, walking back from the peer (the throttle keys on it)."""
    chain = [a.strip() for v in forwarded for a in v.split(",") if a.strip()]
    hop = peer
    for hop in [peer, *reversed(chain)]:
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a hop that is not an address: believe only the peer
        if not any(ip in net for net in trusted):
            return hop
    return hop


__all__ = [
    "Authenticator",
    "CredentialCache",
    "Credentials",
    "FailureThrottle",
    "client_behind_proxies",
    "is_canonical",
    "parse_basic",
]

"""Decision mode: answer a front proxy's "may this request pass?" with the gateway's policy.

A front proxy (nginx ``auth_request``, Caddy ``forward_auth``, Traefik ``forwardAuth``, Envoy
``ext_authz`` as an HTTP service) sends a *check request* before it forwards the client's
request itself. The check request describes the *original request* in one of three forms:

==========================  ======================================  ==========================
form                        method                                  target
==========================  ======================================  ==========================
Caddy / Traefik             ``X-Forwarded-Method``                  ``X-Forwarded-Uri``
nginx (our deploy config)   ``X-Original-Method``                   ``X-Original-URI``
Envoy ext_authz (HTTP)      the check request's own method          its own target, after
                                                                    ``--decision-prefix``
==========================  ======================================  ==========================

(``X-Forwarded-Host``/``X-Forwarded-Proto`` are recorded when present.) The header forms are
sent to exactly ``--decision-prefix``; the Envoy form is ``<prefix><original target>``. Those
headers are believed only from ``--trusted-proxy`` peers: a check request from any other
address is refused with 403 ``untrusted_peer`` -- a client that reaches the decision listener
directly learns nothing and can grant itself nothing.

The answer, as the front proxy expects it:

* **200** allowed, with ``X-Authenticated-User``/``X-Authenticated-Roles`` (both empty for
  an anonymous allow on a public route) for the proxy to copy onto the forwarded request;
* **401** with ``WWW-Authenticate`` (no, malformed or wrong credentials), **403** (not
  allowed), **400** (the original request fails the guard), **429**/**503** as in proxy mode.

The guard, the authenticator (cache, throttle, bcrypt bound), the compiled policy snapshot,
the audit line (``"event": "decision"``) and the metrics are the proxy mode's own.

Body-key rules (``body: {json_keys: [...]}``) cannot be decided: a check request carries no
body, and none of these proxies lets us see the body it will forward. Such an allow is turned
into **403** ``body_not_inspectable`` with a reason that says so: never allow what we could
not check. Users that also hold a plain allow for the route are unaffected.

This module imports nothing from the HTTP server: :meth:`Decider.decide` takes the check
request's method, target, headers and peer, and returns ``(status, headers, body)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .audit import AuditLog, milliseconds, now_iso
from .auth import Authenticator, client_behind_proxies, parse_basic
from .errors import Forbidden, GatewayError, NotFound, TooManyRequests, Unauthenticated
from .guard import (
    Rejected,
    canonical_target,
    check_client_headers,
    check_header_sizes,
    check_method,
    is_gateway_path,
)
from .http.message import JSON_TYPE, json_body
from .metrics import Metrics
from .policy import Decision, Policy, PolicyStore, User
from .settings import Network, Settings

Answer = tuple[int, dict[str, str], bytes]

# Header forms: (name of the method header, name of the target header, proxies that send it).
FORWARDED = ("X-Forwarded-Method", "X-Forwarded-Uri")  # Caddy forward_auth, Traefik
ORIGINAL = ("X-Original-Method", "X-Original-URI")  # nginx auth_request (deploy/nginx)
IDENTITY_HEADERS = ("X-Authenticated-User", "X-Authenticated-Roles")
# The gateway's own endpoints that keep their proxy-mode meaning in decision mode (answered by
# the pipeline). Everything else on a decision listener is the Decider's: it never forwards.
ADMIN_PATHS = frozenset({"/-/healthz", "/-/status", "/-/metrics", "/-/reload"})
READY_PATH = "/-/ready"
_METHOD_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyz"
)


class Headers(Protocol):
    """The read side of a multidict (aiohttp's ``CIMultiDictProxy`` fits)."""

    def get(self, key: str, default: None = None) -> str | None: ...
    def getall(self, key: str, default: Iterable[str] = ()) -> list[str]: ...
    def __contains__(self, key: object) -> bool: ...


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The client's request as the front proxy describes it."""

    method: str
    raw_target: str  # as the proxy will forward it: checked by the guard
    host: str | None
    proto: str | None
    form: str  # "forwarded" (Caddy/Traefik), "original" (nginx), "prefix"


class UntrustedPeer(Forbidden):
    """A check request from an address outside ``--trusted-proxy``."""

    code = "untrusted_peer"


def is_trusted(peer: str | None, trusted: tuple[Network, ...]) -> bool:
    """True when ``peer`` (an IP address) is inside one of the ``trusted`` networks."""
    if not peer:
        return False
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def original_request(
    method: str, raw_path: str, headers: Headers, peer: str | None, settings: Settings
) -> OriginalRequest:
    """Read the original request from a check request, or raise.

    403 :class:`UntrustedPeer` when ``peer`` is not a trusted proxy; 404 when the target is
    not under the decision prefix; 400 (:class:`~gateway.guard.Rejected`) when the
    description is incomplete, ambiguous or repeated.
    """
    if not is_trusted(peer, settings.trusted_proxies):
        raise UntrustedPeer(
            f"decision requests are accepted only from --trusted-proxy "
            f"addresses, not from {peer or 'an unknown peer'}"
        )
    prefix = settings.decision_prefix
    path, _, _ = raw_path.partition("?")
    if path != prefix and not path.startswith(prefix + "/"):
        raise NotFound(
            f"this is a decision listener: check requests go to {prefix} "
            f"(or {prefix}/<original path> for Envoy ext_authz)"
        )
    forms = [
        (name, pair)
        for name, pair in (("forwarded", FORWARDED), ("original", ORIGINAL))
        if pair[0] in headers or pair[1] in headers
    ]
    if len(forms) > 1:
        raise Rejected(
            "both X-Forwarded-Method/-Uri and X-Original-Method/-URI were sent; "
            "a check request must describe the original request once",
            code="decision_ambiguous",
        )
    host, proto = _single(headers, "X-Forwarded-Host"), _single(headers, "X-Forwarded-Proto")
    if forms:
        form, (method_header, target_header) = forms[0]
        if path != prefix:
            raise Rejected(
                f"a check request with {target_header} goes to exactly {prefix}",
                code="decision_ambiguous",
            )
        orig_method, target = _single(headers, method_header), _single(headers, target_header)
        if orig_method is None or target is None:
            raise Rejected(
                f"a check request needs both {method_header} and {target_header}",
                code="decision_incomplete",
            )
    else:
        form, orig_method, target = "prefix", method, raw_path[len(prefix) :]
        if not target.startswith("/"):
            raise Rejected(
                f"no original request: send {FORWARDED[0]}/{FORWARDED[1]}, "
                f"{ORIGINAL[0]}/{ORIGINAL[1]}, or {prefix}/<original path>",
                code="decision_incomplete",
            )
    if not orig_method or not set(orig_method) <= _METHOD_CHARS:
        raise Rejected("the original method is not an HTTP method token", code="method")
    return OriginalRequest(orig_method, target, host, proto, form)


def _single(headers: Headers, name: str) -> str | None:
    values = headers.getall(name, ())
    if len(values) > 1:
        raise Rejected(f"{name} sent more than once", code="decision_ambiguous")
    return values[0] if values else None


class Decider:
    """Answers check requests: guard → authenticate → authorize → record, never forward."""

    def __init__(
        self,
        settings: Settings,
        store: PolicyStore,
        auth: Authenticator,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.auth = auth
        self.audit = audit
        self.metrics = metrics

    @staticmethod
    def owns(raw_path: str) -> bool:
        """True for every request a decision listener answers through :meth:`decide`
        (all but the gateway's own health/status/metrics/reload endpoints)."""
        return raw_path not in ADMIN_PATHS

    async def decide(
        self,
        method: str,
        raw_path: str,
        headers: Headers,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        peer: str | None,
    ) -> Answer:
        """The answer to one check request; writes its audit line and metrics."""
        started = time.perf_counter()
        client = client_behind_proxies(
            peer or "unknown", headers.getall("X-Forwarded-For", ()), self.settings.trusted_proxies
        )
        record: dict[str, object] = {
            "event": "decision",
            "mode": "decision",
            "time": now_iso(),
            "client": client,
            "proxy": peer,
            "user": None,
            "method": None,
            "path": None,
            "host": None,
            "decision": "error",
            "rule": None,
        }
        try:
            if raw_path == READY_PATH and method in ("GET", "HEAD"):
                record.update(event="request", method=method, path=READY_PATH, decision="public")
                # No upstream to probe: ready as soon as a policy is in force (always, once
                # the process listens: a refused policy at start means no listener).
                answer = _json(
                    200, {"status": "ready", "mode": "decide", "policy": self.store.policy.sha256}
                )
            else:
                answer = await self._decide(
                    method, raw_path, headers, raw_headers, peer, client, record
                )
        except GatewayError as exc:
            answer = self._refusal(exc, record)
        elapsed = time.perf_counter() - started
        record["status"] = answer[0]
        record["total_ms"] = milliseconds(elapsed)
        self.audit.write(record)
        self.metrics.observe(str(record["decision"]), answer[0], elapsed)
        return answer

    async def _decide(
        self,
        method: str,
        raw_path: str,
        headers: Headers,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        peer: str | None,
        client: str,
        record: dict[str, object],
    ) -> Answer:
        check_header_sizes(raw_headers, self.settings.max_header_bytes)
        orig = original_request(method, raw_path, headers, peer, self.settings)
        record.update(method=orig.method, host=orig.host, form=orig.form)
        # The proxies pass the client's headers on the check request: an override header
        # the client sent is refused here as it is in proxy mode.
        check_method(orig.method, headers)
        check_client_headers(raw_headers)
        target = canonical_target(orig.raw_target)
        record["path"] = target.path
        if is_gateway_path(target.path):
            # Grants under /- are for the gateway's own endpoints; the front proxy would
            # pass such a request to the service, which proxy mode never does.
            raise Forbidden(
                f"{target.path} is under /-, the gateway's own paths: never passed to the "
                f"service (ask the gateway's listener itself)",
                code="gateway_path",
            )
        policy = self.store.policy  # one snapshot for the whole decision
        user, decision = await self._authorize(
            orig.method, target.path, target.segments, headers, client, policy, record
        )
        record["rule"] = decision.rule.id if decision.rule else None
        if decision.body_keys:
            who = user.name if user else "anonymous"
            raise Forbidden(
                f"{orig.method} {target.path} is allowed for {who!r} only with a "
                f"JSON body whose keys are checked, and a front proxy's check "
                f"request carries no body: denied in decision mode",
                code="body_not_inspectable",
            )
        record["decision"] = "allow"
        # Always both headers, empty for an anonymous (public) allow: a proxy that copies a
        # header the answer lacks may copy something else (Caddy 2.6 copies the unexpanded
        # placeholder), and nginx drops a header set to an empty value.
        out = {
            IDENTITY_HEADERS[0]: user.name if user else "",
            IDENTITY_HEADERS[1]: user.roles_header if user else "",
        }
        # No body: nginx does not read an auth_request answer's body, so a body would cost
        # it the keep-alive connection to us (a new connection per check).
        return 200, out, b""

    async def _authorize(
        self,
        method: str,
        path: str,
        segments: tuple[str, ...],
        headers: Headers,
        client: str,
        policy: Policy,
        record: dict[str, object],
    ) -> tuple[User | None, Decision]:
        creds = parse_basic(headers.get("Authorization"), policy.realm)
        if creds is None:
            decision = policy.decide(None, method, segments)
            if not decision.allowed:
                raise Unauthenticated("authentication required", realm=policy.realm)
            return None, decision
        try:
            user = await self.auth.authenticate(policy, creds, client)
        except Unauthenticated:
            self.metrics.auth_failures.labels("invalid_credentials").inc()
            self.audit.write(
                {
                    "event": "auth_failure",
                    "mode": "decision",
                    "time": now_iso(),
                    "client": client,
                    "user": creds.user,
                    "method": method,
                    "path": path,
                }
            )
            raise
        except TooManyRequests:
            self.metrics.throttled.inc()
            if self.settings.throttle_delay:  # the tarpit, as in proxy mode
                await asyncio.sleep(self.settings.throttle_delay)
            raise
        record["user"] = user.name  # verified: a refusal below is audited with it
        decision = policy.decide(user.name, method, segments)
        if not decision.allowed:
            raise Forbidden(f"user {user.name!r} may not {method} {path}")
        return user, decision

    def _refusal(self, exc: GatewayError, record: dict[str, object]) -> Answer:
        if isinstance(exc, Rejected):
            self.metrics.rejections.labels(exc.code).inc()
        if exc.audit_decision is not None:
            record["decision"] = exc.audit_decision
        record["reason"] = exc.message
        return _json(
            exc.status,
            {"error": exc.message, "status": exc.status, "code": exc.code},
            exc.headers(),
        )


def _json(status: int, doc: object, headers: Mapping[str, str] | None = None) -> Answer:
    return status, {"Content-Type": JSON_TYPE, **(headers or {})}, json_body(doc)

"""The gateway's errors, drawn once.

::

    GatewayError                 any failure that becomes an HTTP answer (JSON body)
    ├── BadRequest         400   the request target or framing is not acceptable (guard)
    ├── Unauthenticated    401   no, malformed or wrong credentials (WWW-Authenticate sent)
    ├── Forbidden          403   authenticated, but the policy does not allow the request
    ├── NotFound           404   an unknown gateway endpoint under /-/
    ├── RequestTimeout     408   the client stopped sending its request body
    ├── PayloadTooLarge    413   request body over the limit
    ├── UnprocessablePolicy 422  a reload was asked for and the new policy was refused
    ├── TooManyRequests    429   failed-login throttle (Retry-After sent)
    ├── HeadersTooLarge    431   request header block over the limit
    ├── BadGateway         502   the upstream could not be reached or broke the exchange
    ├── Overloaded         503   too many password checks in flight, or not ready
    └── GatewayTimeout     504   the upstream did not answer in time

    PolicyError                  a policy file could not be loaded (file, line, key path)

Every ``GatewayError`` carries an HTTP ``status`` and a stable ``code``; the app turns it into
``{"error": message, "status": N, "code": code}`` in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error that is answered to the client."""

    status = 500
    code = "internal"
    audit_decision: str | None = None  # the audit line's "decision" when this ends a request

    def __init__(self, message: str = "internal error", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers that belong to this error."""
        return {}


class BadRequest(GatewayError):
    status, code = 400, "bad_request"


class Unauthenticated(GatewayError):
    status, code = 401, "unauthenticated"
    audit_decision = "unauthenticated"

    def __init__(
        self,
        message: str = "authentication required",
        *,
        realm: str = "gateway",
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.realm = realm

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'}


class Forbidden(GatewayError):
    status, code = 403, "forbidden"
    audit_decision = "deny"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(GatewayError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnprocessablePolicy(GatewayError):
    status, code = 422, "policy_refused"

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


class TooManyRequests(GatewayError):
    status, code = 429, "too_many_failed_logins"
    audit_decision = "throttled"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class HeadersTooLarge(GatewayError):
    status, code = 431, "headers_too_large"


class BadGateway(GatewayError):
    status, code = 502, "upstream_unreachable"


class Overloaded(GatewayError):
    status, code = 503, "overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class GatewayTimeout(GatewayError):
    status, code = 504, "upstream_timeout"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy file, located as precisely as we can."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyError(Exception):
    """A policy file was refused; ``problems`` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

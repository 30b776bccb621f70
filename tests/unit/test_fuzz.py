"""Fuzzing the Authorization header and request bodies: never a 5xx the design did not mean."""

from __future__ import annotations

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BY_DESIGN = {502, 503, 504}
FUZZ = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=300
)
credential_bytes = st.binary(max_size=200)
auth_values = st.one_of(
    header_text,
    st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), credential_bytes),
    st.builds(lambda t: "Basic " + t, header_text),
    st.builds(
        lambda u, p: "Basic " + base64.b64encode(u + b":" + p).decode(),
        credential_bytes,
        credential_bytes,
    ),
    st.builds(
        lambda s, t: f"{s} {t}",
        st.sampled_from(["basic", "BASIC", "Bearer", "Digest", "Basic ", " Basic"]),
        header_text,
    ),
)


def header_bytes(value: str) -> bytes:
    return value.encode("latin-1")


@FUZZ
@given(value=auth_values, method=st.sampled_from(["GET", "POST", "DELETE"]))
async def test_authorization_header_fuzz(raw_gateway, value, method) -> None:
    raw = (
        f"{method} /api/inventory HTTP/1.1\r\nHost: t\r\n".encode()
        + b"Authorization: "
        + header_bytes(value).strip()
        + b"\r\n"
        + (b"Content-Length: 0\r\n" if method == "POST" else b"")
        + b"Connection: close\r\n\r\n"
    )
    status, _, _ = await raw_gateway.send(raw)
    assert status < 500 or status in BY_DESIGN, (value, status)
    assert status in (200, 400, 401, 403, 429), (value, status)


bodies = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=10,
    ).map(lambda v: __import__("json").dumps(v).encode()),
)


@FUZZ
@given(
    body=bodies,
    user=st.sampled_from(["warehouse", "manager"]),
    method=st.sampled_from(["PUT", "POST"]),
    ctype=st.sampled_from(["application/json", "text/plain", ""]),
    chunked=st.booleans(),
)
async def test_request_body_fuzz(raw_gateway, body, user, method, ctype, chunked) -> None:
    pw = {"warehouse": "imthewarehouse", "manager": "imthemanager"}[user]
    token = base64.b64encode(f"{user}:{pw}".encode()).decode()
    head = (
        f"{method} /api/inventory?name=x HTTP/1.1\r\nHost: t\r\nAuthorization: Basic {token}\r\n"
    ).encode()
    if ctype:
        head += f"Content-Type: {ctype}\r\n".encode()
    if chunked:
        framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        head += b"Transfer-Encoding: chunked\r\n"
    else:
        framed = body
        head += f"Content-Length: {len(body)}\r\n".encode()
    status, _, _ = await raw_gateway.send(head + b"Connection: close\r\n\r\n" + framed)
    assert status < 500 or status in BY_DESIGN, (body[:50], status)

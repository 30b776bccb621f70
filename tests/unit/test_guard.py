"""The request guard on raw targets (pure: no server)."""

from __future__ import annotations

import pytest

from gateway.guard import Rejected, canonical_target, check_method


@pytest.mark.parametrize(
    "raw,path,segments,query",
    [
        ("/", "/", (), ""),
        ("/api/inventory", "/api/inventory", ("api", "inventory"), ""),
        (
            "/api/inventory?name=X-Men+1+(1991)",
            "/api/inventory",
            ("api", "inventory"),
            "name=X-Men+1+(1991)",
        ),
        ("/api/inventory/", "/api/inventory/", ("api", "inventory", ""), ""),
        ("/a%41b", "/aAb", ("aAb",), ""),  # unreserved escapes are decoded
        ("/caf%C3%A9", "/caf%C3%A9", ("café",), ""),  # UTF-8 kept encoded, upper-case
        ("/caf%c3%a9", "/caf%C3%A9", ("café",), ""),
        ("/a%20b", "/a%20b", ("a b",), ""),
        ("/a%3Bb", "/a%3Bb", ("a;b",), ""),  # an encoded ';' is data
        ("/.well-known/x", "/.well-known/x", (".well-known", "x"), ""),
        ("/a..b/...", "/a..b/...", ("a..b", "..."), ""),
        ("/x?a=%2F..%2F", "/x", ("x",), "a=%2F..%2F"),  # query never normalised
    ],
)
def test_acceptable_targets_get_one_canonical_path(raw, path, segments, query) -> None:
    t = canonical_target(raw)
    assert (t.path, t.segments, t.query) == (path, segments, query)
    assert canonical_target(t.path_qs) == t  # canonical is a fixed point


@pytest.mark.parametrize(
    "raw,code",
    [
        ("/a/../b", "dot_segment"),
        ("/a/./b", "dot_segment"),
        ("/..", "dot_segment"),
        ("/a/%2e%2e/b", "dot_segment"),
        ("/a/%2E%2e/b", "dot_segment"),
        ("/a/.%2e/b", "dot_segment"),
        ("/a/%2e/b", "dot_segment"),
        ("/a%2Fb", "encoded_separator"),
        ("/a%2fb", "encoded_separator"),
        ("/a%5Cb", "encoded_separator"),
        ("/a\\b", "encoded_separator"),
        ("/a%252e%252e/b", "encoded_separator"),  # double encoding
        ("//admin", "empty_segment"),
        ("/api//inventory", "empty_segment"),
        ("/api/..;/admin", "path_param"),
        ("/api;jsessionid=1/x", "path_param"),
        ("/a#frag", "fragment"),
        ("/a%00b", "control_char"),
        ("/a%0Ab", "control_char"),
        ("/a%7Fb", "control_char"),
        ("/a%zz", "bad_escape"),
        ("/a%4", "bad_escape"),
        ("/a%", "bad_escape"),
        ("/a%C0%AE%C0%AE/b", "bad_utf8"),  # overlong '.'
        ("/a%FF", "bad_utf8"),
        ("/a b", "bad_char"),
        ("/a\x01", "control_char"),
        ("/caf\u00e9", "bad_char"),
        ("http://other/path", "target_form"),
        ("other:443", "target_form"),
        ("*", "target_form"),
        ("/x?a=\x01", "query"),
        ("/x?a=b c", "query"),
    ],
)
def test_ambiguous_targets_are_rejected(raw, code) -> None:
    with pytest.raises(Rejected) as exc:
        canonical_target(raw)
    assert exc.value.code == code
    assert exc.value.status == 400


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "TRACK"])
def test_tunnel_and_echo_methods_are_rejected(method) -> None:
    with pytest.raises(Rejected):
        check_method(method, {})


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"])
def test_method_override_headers_are_rejected(header) -> None:
    from multidict import CIMultiDict

    with pytest.raises(Rejected) as exc:
        check_method("POST", CIMultiDict({header.lower(): "DELETE"}))
    assert exc.value.code == "method_override"


@pytest.mark.parametrize("method", ["delete", "Delete", "get", "123"])
def test_methods_not_in_upper_case_are_rejected(method) -> None:
    """Rules name methods in upper case; "delete" would be decided as an unknown method and
    then run as DELETE by a service that upper-cases it (decision mode takes it from a header)."""
    with pytest.raises(Rejected) as exc:
        check_method(method, {})
    assert exc.value.code == "method"


def test_ordinary_methods_pass() -> None:
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        check_method(m, {})

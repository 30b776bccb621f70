"""Optional TLS on the listener (--tls-cert/--tls-key), with a real process."""

from __future__ import annotations

import http.client
import os
import shutil
import ssl
import subprocess
import urllib.request

import pytest

from tests.helpers import SHIPPED_POLICY, Process, basic

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("GATEWAY_URL")), reason="starts its own process"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert"),
]


def test_gateway_serves_https_with_the_given_certificate(tmp_path, stack) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    gw = Process(
        [
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--upstream",
            stack.backend_url,
            "--policy",
            str(SHIPPED_POLICY),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--audit-log",
            "off",
            "--no-watch",
        ],
        tmp_path / "gw.log",
    )
    try:
        url = gw.wait_listening()
        assert url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        req = urllib.request.Request(
            url + "/api/inventory?name=X-Men+1+(1991)", headers=basic("sales", "imsales")
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # no plain HTTP on TLS
            urllib.request.urlopen(
                url.replace("https://", "http://") + "/-/healthz", timeout=5
            ).read()
    finally:
        assert gw.stop() == 0


def test_unreadable_certificate_is_one_clear_line(tmp_path) -> None:
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            "0",
            "--policy",
            str(SHIPPED_POLICY),
            "--tls-cert",
            str(tmp_path / "nope.pem"),
            "--tls-key",
            str(tmp_path / "nope.key"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2  # refused with the flags, before anything starts
    assert r.stderr == (
        f"python -m gateway serve: --tls-cert (GATEWAY_TLS_CERT): "
        f"{tmp_path / 'nope.pem'}: No such file or directory\n"
    )

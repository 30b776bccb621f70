"""The tutorial's Flask gateway, reproduced as the low anchor (run only with --peers).

    python bench/flask_app.py --port PORT --upstream http://127.0.0.1:P --user U --hash-file F

What such tutorials do: werkzeug's `check_password_hash` against a pbkdf2 hash on every
request (no cache), then forward with `requests` (a new connection each time), served by
Flask's own threaded server. Runs from a throwaway venv under bench/.peers, never .venv.
"""

from __future__ import annotations

import argparse

import requests
from flask import Flask, Response, request
from werkzeug.security import check_password_hash

HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
    "content-encoding",
}


def create_app(upstream: str, user: str, pw_hash: str) -> Flask:
    app = Flask(__name__)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE"])
    def proxy(path: str) -> Response:
        auth = request.authorization
        if (
            not auth
            or auth.username != user
            or not check_password_hash(pw_hash, auth.password or "")
        ):
            return Response("unauthorized\n", 401, {"WWW-Authenticate": 'Basic realm="bench"'})
        resp = requests.request(
            request.method,
            f"{upstream}/{path}",
            params=request.args,
            data=request.get_data(),
            timeout=10,
        )
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP]
        return Response(resp.content, resp.status_code, headers)

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--hash-file", required=True)
    args = p.parse_args()
    with open(args.hash_file) as f:
        pw_hash = f.read().strip()
    create_app(args.upstream.rstrip("/"), args.user, pw_hash).run(
        args.host, args.port, threaded=True
    )


if __name__ == "__main__":
    main()

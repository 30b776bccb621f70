"""aiohttp's HTTP/1 protocol handler, with the gateway's error answers.

Requests that aiohttp's C parser (llhttp) refuses never reach the pipeline: a smuggling-shaped
message (``Content-Length`` with ``Transfer-Encoding``, duplicated ``Content-Length``), a bad
request line, control characters, an oversize header. aiohttp answers those in plain text and
logs a traceback; here they get the same JSON shape as every other error, 431 for oversize
headers, one log line, and the connection is closed.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


class GatewayRequestHandler(RequestHandler):
    """RequestHandler whose parser-level errors are JSON and logged in one line."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        code = "bad_request"
        if isinstance(exc, LineTooLong) or (
                isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            status, code, text = 431, "headers_too_large", "request header block too large"
        elif isinstance(exc, BadHttpMessage):
            text = (exc.message or "bad request").strip().splitlines()[0].rstrip(":")
            status = 400
        elif status >= 500:
            code, text = "internal", "internal error"
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            text = (message or "bad request").strip().splitlines()[0]
        if status < 500:
            log.info("refused malformed request from %s: %s", request.remote, text)
        body = json.dumps({"error": text, "status": status, "code": code})
        resp = web.Response(status=status, text=body, content_type="application/json")
        resp.force_close()
        return resp


class _GatewayServer(web.Server):
    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """AppRunner whose connections use :class:`GatewayRequestHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GatewayServer   # same object, only the handler class differs
        return server

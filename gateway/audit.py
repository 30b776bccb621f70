"""Recording: one JSON audit line per request (the metrics are in :mod:`gateway.metrics`)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import sys
import time
from typing import IO, Any

import orjson

log = logging.getLogger(__name__)

_JSON_LINE = orjson.OPT_APPEND_NEWLINE


class AuditLog:
    """Writes one JSON object per line; never credentials, never hashes.

    Writing can never fail a request: an OSError (a full disk, EIO, a closed stream) is
    counted (``write_errors``: failed write attempts; ``dropped_lines``), remembered
    (``last_error``), logged once per episode (WARNING when writing starts failing, INFO with
    the number of lines dropped when it works again), and the lines concerned are dropped
    whole. Lines are buffered whole and written with ``os.write`` on an ``O_APPEND`` fd; when a
    write stops part-way through a line, the fragment is cut off the file again (ftruncate
    back to the last whole line, when nobody appended after it), else the next write starts
    with a newline, so the line after a failure always starts at a line boundary.
    """

    BUFFER_BYTES = 1 << 16

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True) -> None:
        """Write through to a text ``stream`` (stdout by default) on every line."""
        self.enabled = enabled
        self.name = str(getattr(stream, "name", "<stream>")) if stream is not None else "<stdout>"
        self._stream = stream or sys.stdout
        self._fd: int | None = None
        self._owns_fd = False
        self._limit = 0  # bytes buffered before a write; 0 = write each line
        self._buf = bytearray()  # whole lines only (JSON escapes newlines)
        self._torn = False  # a fragment we could not cut off ends the file
        self.write_errors = 0
        self.dropped_lines = 0
        self.last_error: str | None = None
        self._failing = False
        self._episode_dropped = 0

    @classmethod
    def to_file(cls, path: str) -> AuditLog:
        """Append to ``path`` (``-``: standard output), buffered; see :meth:`flush_every`."""
        audit = cls()
        if path == "-":
            audit._fd, audit.name = 1, "<stdout>"  # the process's stdout, not a wrapper
        else:
            audit._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            audit._owns_fd, audit.name = True, path
        # Block-buffered: a write() per request would cost a syscall each; the app flushes
        # every half second (flush_every) and at shutdown.
        audit._limit = cls.BUFFER_BYTES
        return audit

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line; never raises for the sake of the disk."""
        if not self.enabled:
            return
        # Into a bytearray: keeping each line's bytes object alive until the flush costs
        # more than encoding it (~2 us vs ~0.3 us a line).
        self._buf += orjson.dumps(record, default=str, option=_JSON_LINE)
        if len(self._buf) >= self._limit:
            self.flush()

    def write_line(self, line: bytes) -> None:
        """Queue one line made elsewhere (one JSON object and its newline, see
        :func:`request_line`); never raises for the sake of the disk."""
        if not self.enabled:
            return
        self._buf += line
        if len(self._buf) >= self._limit:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines; on an error drop them (counted, logged), never raise."""
        if not self._buf:
            return
        data, self._buf = bytes(self._buf), bytearray()
        done = 0
        try:
            if self._torn:
                self._write_all(b"\n")
                self._torn = False
            done = self._write_all(data)
        except _PartialWrite as exc:
            done = exc.done
            self._failed(
                exc.error, data.count(b"\n", done), done - (data.rfind(b"\n", 0, done) + 1)
            )
            return
        self._recovered()

    def _write_all(self, data: bytes) -> int:
        done = 0
        try:
            if self._fd is None:
                self._stream.write(data.decode())
                self._stream.flush()
                return len(data)
            view = memoryview(data)
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except (OSError, ValueError) as exc:  # ValueError: a closed text stream
            raise _PartialWrite(done, exc) from None
        return done

    def _failed(self, exc: Exception, dropped: int, fragment: int) -> None:
        self.write_errors += 1
        self.dropped_lines += dropped
        self._episode_dropped += dropped
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
            self.last_error = f"{errno.errorcode[exc.errno]}: {exc.strerror}"
        else:
            self.last_error = str(exc)
        if fragment:
            self._cut(fragment)
        if not self._failing:
            self._failing = True
            log.warning(
                "audit log %s: cannot write (%s); dropping audit lines until it works again",
                self.name,
                self.last_error,
            )

    def _cut(self, fragment: int) -> None:
        """Remove the last ``fragment`` bytes we wrote, if they still end the file."""
        assert self._fd is not None
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)  # O_APPEND: just after our bytes
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == end:
                os.ftruncate(self._fd, end - fragment)
                return
        except OSError:
            pass
        self._torn = True

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info(
                "audit log %s: writing again; %d lines were dropped",
                self.name,
                self._episode_dropped,
            )
            self._episode_dropped = 0

    def fileno(self) -> int | None:
        """The fd lines go to (None when writing through to a text stream)."""
        return self._fd

    def status(self) -> dict[str, object]:
        """For ``/-/status``: write errors and dropped lines so far, the last error."""
        return {
            "file": self.name,
            "failing": self._failing,
            "write_errors": self.write_errors,
            "dropped_lines": self.dropped_lines,
            "last_error": self.last_error,
        }

    async def flush_every(self, seconds: float) -> None:
        """Flush periodically so that ``tail -f`` and log shippers see lines promptly."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def close(self) -> None:
        """Flush and close; never raises (a failure is logged and counted)."""
        self.flush()
        if self._failing:
            log.warning(
                "audit log %s: closed while failing (%s); %d lines dropped in all",
                self.name,
                self.last_error,
                self.dropped_lines,
            )
        try:
            if self._owns_fd and self._fd is not None:
                os.close(self._fd)
            elif self._fd is None and self._stream not in (sys.stdout, sys.stderr):
                self._stream.close()
        except OSError as exc:
            log.warning("audit log %s: close failed: %s", self.name, exc)
        self._fd, self._owns_fd = None, False
        self.enabled = False


class _PartialWrite(Exception):
    def __init__(self, done: int, error: Exception) -> None:
        self.done, self.error = done, error


class _Stamp:
    """The last time stamp made, and the second it began with."""

    __slots__ = ("ms", "text", "sec", "sec_text")

    def __init__(self) -> None:
        self.ms = self.sec = -1
        self.text = self.sec_text = ""


_stamp = _Stamp()


def milliseconds(seconds: float) -> float:
    """``seconds`` in milliseconds to the microsecond (as round(x, 3), without its decimal
    conversion, which costs more than the rest of the audit line)."""
    return int(seconds * 1_000_000 + 0.5) / 1000


def request_fields(
    client: str, user: str | None, method: str, path: str, decision: str, rule: str | None
) -> bytes:
    """The middle of a request's audit line (see :func:`request_line`), as JSON."""
    doc = {
        "client": client,
        "user": user,
        "method": method,
        "path": path,
        "decision": decision,
        "rule": rule,
    }
    return orjson.dumps(doc)[1:-1]


def request_line(
    time_iso: str, fields: bytes, status: int, upstream_ms: float | None, total_ms: float
) -> bytes:
    """A request's audit line, byte for byte what :meth:`AuditLog.write` makes of the record
    ``{"event": "request", "time": ..., <fields>, "status": ..., "upstream_ms": ...,
    "total_ms": ...}``, for a caller that keeps ``fields`` made once for requests that
    repeat them (the numbers are orjson's too: Python's float repr costs twice as much)."""
    tail = orjson.dumps(
        {"status": status, "upstream_ms": upstream_ms, "total_ms": total_ms}, option=_JSON_LINE
    )
    return b'{"event":"request","time":"%s",%s,%s' % (time_iso.encode(), fields, tail[1:])


def now_iso() -> str:
    """UTC time with milliseconds; the part up to the second is formatted once a second, the
    whole string once a millisecond (under load, several requests end in the same one)."""
    ms = int(time.time() * 1000)
    st = _stamp
    if st.ms == ms:
        return st.text
    sec, frac = divmod(ms, 1000)
    if st.sec != sec:
        st.sec, st.sec_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    st.ms, st.text = ms, f"{st.sec_text}.{frac:03d}Z"
    return st.text

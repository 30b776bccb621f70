"""``--workers N``: a supervisor that keeps N worker processes serving one port.

The supervisor serves nothing itself. It

* starts N workers (``python -m gateway serve``) that share the port through SO_REUSEPORT,
  handing each its :class:`Settings` explicitly (JSON in ``GATEWAY_WORKER_SETTINGS``), never by
  re-reading ``sys.argv``;
* restarts a worker that exits for any reason while the supervisor is not stopping, after a
  back-off per worker slot (0.1 s, doubling to 5 s; back to 0.1 s once a worker lived 10 s),
  logs each death (pid, exit code or signal) and restart, and counts restarts;
* keeps the one failed-login throttle of all workers (:mod:`gateway.throttle`): a
  guesser whose connections land on different workers is counted once;
* forwards SIGHUP to every live worker; on SIGTERM/SIGINT forwards SIGTERM, waits up to a grace
  period, SIGKILLs what is left and exits 0 (a second SIGTERM/SIGINT a second or more after
  the first kills at once);
* makes its workers die with it: each worker asks the kernel for SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``, armed in :func:`worker_settings`, then ``getppid()`` is checked to close
  the race with a supervisor that died before that), and, as a fallback, watches a pipe whose
  write end only the supervisor holds (:func:`watch_parent`: EOF = supervisor gone).

Why a probe bind rather than one listening socket passed to the workers: workers bind their own
SO_REUSEPORT sockets (the kernel spreads connections evenly over them, and the worker code
needs no fd hand-over), so SO_REUSEPORT itself would let a second gateway join the port. Before
anything binds, :func:`check_port` binds the address *without* SO_REUSEPORT: the kernel refuses
that (EADDRINUSE) while any socket -- a gateway's worker, a supervisor's port holder, or another
program -- holds the port, whatever options it set. Sharing on purpose needs ``--reuse-port``
(``GATEWAY_REUSE_PORT``). Two gateways started at the very same instant could both pass the
probe (it is not atomic with the bind that follows); that window is microseconds, and the
common case -- an old generation still serving, orphaned or not -- is refused.

Environment a worker receives (set by the supervisor, read by the functions below):
``GATEWAY_WORKER_OF`` (supervisor pid), ``GATEWAY_WORKER_SETTINGS``, ``GATEWAY_PARENT_FD``,
``GATEWAY_WORKER_SLOT`` (0..N-1), ``GATEWAY_WORKER_RESTARTS`` (restarts the supervisor had
done when this worker started; see :func:`worker_status`), ``GATEWAY_THROTTLE_FD`` (the
worker's end of its link to the shared failed-login throttle, :mod:`gateway.throttle`),
``GATEWAY_THROTTLE_KEY`` (the key all workers name credentials with on that link).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from .settings import Settings, decode_settings, encode_settings
from .throttle import THROTTLE_FD_ENV, THROTTLE_KEY_ENV, ThrottleService

log = logging.getLogger(__name__)

WORKER_ENV = "GATEWAY_WORKER_OF"
SETTINGS_ENV = "GATEWAY_WORKER_SETTINGS"
PARENT_FD_ENV = "GATEWAY_PARENT_FD"
SLOT_ENV = "GATEWAY_WORKER_SLOT"
RESTARTS_ENV = "GATEWAY_WORKER_RESTARTS"

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
BACKOFF_RESET_AFTER = 10.0  # a worker that lived this long was healthy: next delay is 0.1 s
REPEAT_AFTER = 1.0  # a second SIGTERM/SIGINT sooner than this is the same stop, not "now"
STOP_GRACE = 40.0  # > the workers' own drain (upstream timeout 30 s + margin)

_PR_SET_PDEATHSIG = 1


# -- the port ------------------------------------------------------------------------------


def check_port(settings: Settings) -> str | None:
    """None when ``settings.host:port`` is free (or sharing was asked for); else the refusal.

    Call it before binding, in the supervisor and in a single-process ``serve``; on a message,
    print it to stderr and exit 1.
    """
    if settings.reuse_port or settings.port == 0:
        return None
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as servers set it, so that connections of a previous run lingering in
        # TIME_WAIT do not count as "in use"; a listener still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"gateway: {settings.host}:{settings.port} is already in use (another "
                    "gateway?); refusing to start (--reuse-port to share it on purpose)"
                )
            return f"gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
    return None


# -- the worker's side ---------------------------------------------------------------------


def worker_settings() -> Settings | None:
    """In a worker: arm the parent-death signal and return the supervisor's Settings.

    None in any other process. Exits (status 1) when the supervisor is already gone.
    ``gateway.cli`` calls it before parsing the ``serve`` flags.
    """
    text = os.environ.get(SETTINGS_ENV)
    supervisor = os.environ.get(WORKER_ENV)
    if text is None or supervisor is None:
        return None
    _die_with_parent()
    if os.getppid() != int(supervisor):  # it died before the death signal was armed
        print("gateway worker: supervisor gone before the worker started; exiting", file=sys.stderr)
        sys.exit(1)
    return decode_settings(text)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return  # the pipe watched by watch_parent() is the only mechanism there
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)


def watch_parent(loop: asyncio.AbstractEventLoop, on_gone: Callable[[], object]) -> bool:
    """Call ``on_gone()`` once, on the loop, when the supervisor's pipe reaches EOF.

    The fallback to PR_SET_PDEATHSIG (non-Linux, or a death signal lost). A worker's server
    calls it once its loop runs, with the same callback SIGTERM triggers (a graceful stop).
    Returns False outside a worker (nothing to watch).
    """
    fd_text = os.environ.get(PARENT_FD_ENV)
    if fd_text is None:
        return False
    fd = int(fd_text)
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the supervisor never writes: only EOF (its death) wakes us
            loop.remove_reader(fd)
            log.warning("supervisor %s is gone; stopping", os.environ.get(WORKER_ENV))
            on_gone()

    loop.add_reader(fd, readable)
    return True


def worker_status() -> dict[str, int] | None:
    """For ``/-/status`` in a worker: supervisor pid, slot, restarts done before it started."""
    if WORKER_ENV not in os.environ:
        return None
    return {
        "supervisor": int(os.environ[WORKER_ENV]),
        "slot": int(os.environ.get(SLOT_ENV, "0")),
        "restarts": int(os.environ.get(RESTARTS_ENV, "0")),
    }


# -- the supervisor ------------------------------------------------------------------------


def supervise(settings: Settings, grace: float = STOP_GRACE) -> int:
    """Start ``settings.workers`` workers on one port and look after them until stopped."""
    refusal = check_port(settings)
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # Bound, never listening, SO_REUSEPORT only: port 0 resolves once for all workers, and the
    # port stays ours (and refused to a probe) while workers restart.
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((settings.host, settings.port))
    except OSError as exc:
        holder.close()
        print(
            f"gateway: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    port = holder.getsockname()[1]
    try:
        return Supervisor(
            dataclasses.replace(settings, port=port, workers=1), settings.workers, grace
        ).run()
    finally:
        holder.close()


class Supervisor:
    """The process table and the signal loop behind :func:`supervise`."""

    def __init__(self, worker: Settings, count: int, grace: float) -> None:
        self.worker_settings = worker
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.started = [0.0] * count
        self.delay = [BACKOFF_FIRST] * count
        self.due: dict[int, float] = {}  # slot -> when to restart it
        self.restarts = 0
        self.grace = grace
        self.stopping: float | None = None  # deadline for the workers to exit
        self.stop_asked = 0.0  # when the first SIGTERM/SIGINT came
        self._signals: list[int] = []
        self._death_r, self._death_w = os.pipe()  # workers inherit the read end only
        self.throttle = ThrottleService()  # one failed-login throttle for all workers
        self.throttle_key = os.urandom(32).hex()  # how workers name credentials to it

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handled = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            for slot in range(len(self.procs)):
                self._start(slot)
            log.info(
                "gateway supervisor %d: %d workers on %s:%d",
                os.getpid(),
                len(self.procs),
                self.worker_settings.host,
                self.worker_settings.port,
            )
            while not (self.stopping is not None and self._all_gone()):
                self._step()
                timeout = self._timeout()
                links = {sock.fileno(): sock for sock in self.throttle.sockets()}
                ready, _, _ = select.select([wake_r, *links], [], [], timeout)
                for fd in ready:
                    if fd in links:
                        self.throttle.serve(links[fd])
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old.items():
                signal.signal(s, h)
            for fd in (wake_r, wake_w, self._death_r, self._death_w):
                os.close(fd)
            self.throttle.close()
        log.info("gateway supervisor %d stopped (%d worker restarts)", os.getpid(), self.restarts)
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _step(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self._send_all(signal.SIGHUP)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signum)
        self._reap()
        now = time.monotonic()
        if self.stopping is None:
            for slot, when in list(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self.restarts += 1
                    self._start(slot)
                    log.info(
                        "worker slot %d restarted as pid %d (restart #%d)",
                        slot,
                        self._pid(slot),
                        self.restarts,
                    )
        elif now >= self.stopping:
            self._kill_all("did not stop within the grace period")

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.stopping is not None:
            return max(0.0, min(self.stopping - now, 0.5))
        if self.due:
            return max(0.0, min(self.due.values()) - now)
        return None  # SIGCHLD wakes us

    def _start(self, slot: int) -> None:
        link = self.throttle.connect(slot)
        env = dict(os.environ)
        env.update(
            {
                WORKER_ENV: str(os.getpid()),
                SETTINGS_ENV: encode_settings(self.worker_settings),
                PARENT_FD_ENV: str(self._death_r),
                SLOT_ENV: str(slot),
                RESTARTS_ENV: str(self.restarts),
                THROTTLE_FD_ENV: str(link.fileno()),
                THROTTLE_KEY_ENV: self.throttle_key,
            }
        )
        try:
            self.procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                env=env,
                pass_fds=(self._death_r, link.fileno()),
            )
        finally:
            link.close()  # the worker holds its end now
        self.started[slot] = time.monotonic()

    def _pid(self, slot: int) -> int:
        p = self.procs[slot]
        return p.pid if p is not None else 0

    def _reap(self) -> None:
        for slot, p in enumerate(self.procs):
            if p is None or p.poll() is None:
                continue
            self.procs[slot] = None
            self.throttle.drop(slot)
            code = p.returncode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if self.stopping is not None:
                log.info("worker %d (slot %d) stopped: %s", p.pid, slot, how)
                continue
            lived = time.monotonic() - self.started[slot]
            if lived >= BACKOFF_RESET_AFTER:
                self.delay[slot] = BACKOFF_FIRST
            delay = self.delay[slot]
            self.delay[slot] = min(delay * 2, BACKOFF_MAX)
            self.due[slot] = time.monotonic() + delay
            log.warning(
                "worker %d (slot %d) died after %.1f s: %s; restarting in %.1f s",
                p.pid,
                slot,
                lived,
                how,
                delay,
            )

    def _stop(self, signum: int) -> None:
        now = time.monotonic()
        if self.stopping is not None:
            # Asked twice: do not wait any longer -- unless it is the same stop arriving by
            # two ways at once (Ctrl-C signals the whole process group, and a wrapper such as
            # `make run` passes it on): a person asking again takes longer than that.
            if now - self.stop_asked < REPEAT_AFTER:
                log.info("%s again at once: the same stop", signal.Signals(signum).name)
                return
            self._kill_all(f"{signal.Signals(signum).name} received again")
            return
        self.stop_asked = now
        log.info(
            "gateway supervisor %d: %s, stopping %d workers",
            os.getpid(),
            signal.Signals(signum).name,
            sum(p is not None for p in self.procs),
        )
        self.stopping = time.monotonic() + self.grace
        self.due.clear()
        self._send_all(signal.SIGTERM)

    def _send_all(self, sig: int) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(sig)

    def _kill_all(self, why: str) -> None:
        for slot, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                log.warning("worker %d (slot %d) %s; killing it", p.pid, slot, why)
                p.kill()

    def _all_gone(self) -> bool:
        self._reap()
        return all(p is None for p in self.procs)

"""``s3cache serve --workers N``: start N worker processes on one port and look after
them.

Worker 0 (the primary) owns the cache: index, files, fills, prefetch, listings, admin.
Workers 1..N-1 (secondaries) accept connections on the same port (SO_REUSEPORT, so
the kernel spreads connections over the workers) and serve the primary's complete,
verified objects straight from its files; everything else they pass to the primary
over a Unix socket (``server.secondary``). One Python process then no longer caps a
node at one core.

The supervisor itself serves nothing. It makes a private run directory (the primary's
socket, prometheus-client's multi-process files), gives every worker its role in the
environment, passes SIGTERM, SIGINT and SIGHUP on to the workers, and starts a worker
again if it dies (a dead worker's live gauges are dropped from the metrics).

If the supervisor itself is killed (SIGKILL, the OOM killer), its workers die with it
on Linux (``PR_SET_PDEATHSIG``), so that no orphan keeps serving the port or writing the
cache beside the supervisor started next. A killed supervisor leaves its run directory
behind; the next one removes those whose lock no process holds any more.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from s3cache.config import Settings, WorkerRole
from s3cache.metrics import MULTIPROCESS_DIR_ENV

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a worker that died is started again
POLL_SECONDS = 0.2
RUN_PREFIX = "s3cache-run-"
# Held (flock) by the supervisor and, inherited, by every worker while it lives.
LOCK_NAME = "supervisor.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# What a worker gets when its supervisor dies. SIGKILL, not SIGTERM: a SIGTERMed worker
# stops listening at once but drains its in-flight requests for up to 30 s, fills and
# index writes included, so a supervisor started again at once would have its new
# primary open the index and cache files beside an old one still writing them (and
# keep-alive clients of the orphans would be served by a process nobody supervises).
# The cache is crash-safe (data on disk before the index row, a start-up check for
# orphans), and a killed supervisor was no graceful stop anyway: SIGTERM to the
# supervisor is, and drains every worker.
WORKER_DEATH_SIGNAL = signal.SIGKILL


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self._count = settings.workers
        self._argv = list(argv)
        remove_dead_run_dirs(Path(tempfile.gettempdir()))
        self._run_dir, self._lock = _make_run_dir()
        self._die_with_me = _die_with(os.getpid())
        self._metrics_dir = self._run_dir / "metrics"
        self._metrics_dir.mkdir()
        self._secret = secrets.token_hex(32)
        self._primary_url = f"unix:{self._run_dir / 'primary.sock'}"
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._signals: list[int] = []

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            for index in range(self._count):
                self._start(index)
            self._watch()
        finally:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            os.close(self._lock)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # handled by the watch loop, not in the handler

    def _start(self, index: int) -> None:
        role = WorkerRole(index, self._primary_url, self._secret)
        env = {**os.environ, **role.environment(), MULTIPROCESS_DIR_ENV: str(self._metrics_dir)}
        self._workers[index] = subprocess.Popen(
            [sys.executable, "-m", "s3cache", *self._argv],
            env=env,
            pass_fds=(self._lock,),
            # The supervisor runs no threads, so a function between fork and exec is safe.
            preexec_fn=self._die_with_me,
        )
        log.info("worker %d started (pid %d)", index, self._workers[index].pid)

    def _watch(self) -> None:
        restart_at: dict[int, float] = {}
        while self._workers or restart_at:
            while self._signals:
                self._forward(self._signals.pop(0))
            for index, process in list(self._workers.items()):
                code = process.poll()
                if code is None:
                    continue
                del self._workers[index]
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    process.pid, str(self._metrics_dir)
                )
                if not self._stopping:
                    log.error(
                        "worker %d (pid %d) exited with %s: restarting", index, process.pid, code
                    )
                    restart_at[index] = time.monotonic() + RESTART_DELAY
            for index, when in list(restart_at.items()):
                if self._stopping:
                    del restart_at[index]
                elif time.monotonic() >= when:
                    del restart_at[index]
                    self._start(index)
            time.sleep(POLL_SECONDS)

    def _forward(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        for process in self._workers.values():
            process.send_signal(signum)


def _die_with(supervisor: int) -> Callable[[], None]:
    """What a worker runs between fork and exec: take WORKER_DEATH_SIGNAL when its
    parent dies (Linux; the setting survives exec), then check that the parent is
    still the supervisor: if it died before the prctl, no signal will come."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

    def in_the_worker() -> None:
        if prctl is not None and prctl(PR_SET_PDEATHSIG, WORKER_DEATH_SIGNAL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != supervisor:
            os._exit(1)

    return in_the_worker


def _make_run_dir() -> tuple[Path, int]:
    """A new private run directory, and the fd of its lock, held from now on."""
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX))
    staging = run_dir / f"{LOCK_NAME}.new"
    lock = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    # Renamed once held: a lock file another supervisor finds is never one not yet taken.
    staging.rename(run_dir / LOCK_NAME)
    return run_dir, lock


def remove_dead_run_dirs(parent: Path) -> None:
    """Remove the run directories of supervisors that were killed: those whose lock
    nobody holds (the kernel drops a flock when the last process holding it exits, so
    a free lock proves the supervisor and all its workers gone). One without a lock
    file is left alone: it is not provably dead."""
    for run_dir in parent.glob(f"{RUN_PREFIX}*"):
        try:
            lock = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
        except OSError:
            continue  # no lock file, or another user's
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its supervisor or one of its workers lives
        finally:
            os.close(lock)
        log.info("removing %s, left by a supervisor that was killed", run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)

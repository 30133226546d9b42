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
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from s3cache.config import Settings, WorkerRole
from s3cache.metrics import MULTIPROCESS_DIR_ENV

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a worker that died is started again
POLL_SECONDS = 0.2


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self._count = settings.workers
        self._argv = list(argv)
        self._run_dir = Path(tempfile.mkdtemp(prefix="s3cache-run-"))
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
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # handled by the watch loop, not in the handler

    def _start(self, index: int) -> None:
        role = WorkerRole(index, self._primary_url, self._secret)
        env = {**os.environ, **role.environment(), MULTIPROCESS_DIR_ENV: str(self._metrics_dir)}
        self._workers[index] = subprocess.Popen(
            [sys.executable, "-m", "s3cache", *self._argv], env=env
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

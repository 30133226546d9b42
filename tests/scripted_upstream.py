"""A scripted S3-like upstream: answers GET and HEAD of the objects a test puts, the
way S3 does (Range, If-Match, If-None-Match, 416, 404), unless the test tampers with
the answer. It exists to produce what a real S3 server cannot be made to produce on
demand: no ETag, no Last-Modified, ``Content-Range: bytes a-b/*``, another range than
the one asked, 200 to a ranged GET, a body shorter or longer than announced.

Requests are not authenticated (s3cache signs them; the signature is ignored). Each
connection is served by a thread, keep-alive, one request after the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate

LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass(frozen=True)
class Answer:
    """What goes back on the wire: the status line and headers as given, then
    ``body`` (not for a HEAD), then the connection is closed if ``close``."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    close: bool = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def without(self, name: str) -> Answer:
        kept = tuple((k, v) for k, v in self.headers if k.lower() != name.lower())
        return replace(self, headers=kept)

    def with_header(self, name: str, value: str) -> Answer:
        return replace(self.without(name), headers=(*self.without(name).headers, (name, value)))


Tamper = Callable[[Request, Answer], Answer]


@dataclass
class StoredObject:
    body: bytes
    etag: str
    last_modified: str = LAST_MODIFIED
    content_type: str = "application/octet-stream"
    tamper: Tamper | None = None


@dataclass(repr=False)
class ScriptedUpstream:
    """The upstream for ``S3CacheProcess``: it has the attributes of a SeaweedS3 that
    s3cache and boto3 clients need (endpoint, keys, region)."""

    objects: dict[str, StoredObject] = field(default_factory=dict)  # "/bucket/key" ->
    requests: list[Request] = field(default_factory=list)
    access_key: str = "scripted-access-key"
    secret_key: str = "scripted-secret-key"
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()

    def put(self, bucket: str, key: str, body: bytes, tamper: Tamper | None = None) -> None:
        etag = f'"{hashlib.md5(body).hexdigest()}"'
        self.objects[f"/{bucket}/{key}"] = StoredObject(body, etag, tamper=tamper)

    def received(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if method is None or r.method == method]

    def answer(self, request: Request) -> Answer:
        """The (tampered) answer to ``request``, as it goes on the wire."""
        stored = self.objects.get(request.path)
        if stored is None:
            return _error(404, "NoSuchKey")
        answer = conforming_answer(stored, request)
        return stored.tamper(request, answer) if stored.tamper else answer

    # --- the server --------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                request = _parse(head)
                with self._lock:
                    self.requests.append(request)
                answer = self.answer(request)
                conn.sendall(_encode(answer, request.method))
                if answer.close:
                    conn.shutdown(socket.SHUT_RDWR)
                    return


def conforming_answer(stored: StoredObject, request: Request) -> Answer:
    """What S3 answers (GetObject/HeadObject, RFC 9110 §13 and §14)."""
    headers = request.headers
    if "if-match" in headers and headers["if-match"] != stored.etag:
        return _error(412, "PreconditionFailed")
    if headers.get("if-none-match") == stored.etag:
        return Answer(304, (("ETag", stored.etag), ("Last-Modified", stored.last_modified)))
    body, size = stored.body, len(stored.body)
    common = (
        ("ETag", stored.etag),
        ("Last-Modified", stored.last_modified),
        ("Content-Type", stored.content_type),
        ("Accept-Ranges", "bytes"),
    )
    span = _span(request.range, size)
    if span is None:
        return Answer(200, (*common, ("Content-Length", str(size))), body)
    first, last = span
    if first >= size:
        return _error(416, "InvalidRange", (("Content-Range", f"bytes */{size}"),))
    part = body[first : last + 1]
    ranged = (("Content-Range", f"bytes {first}-{last}/{size}"), ("Content-Length", str(len(part))))
    return Answer(206, (*common, *ranged), part)


def _span(header: str | None, size: int) -> tuple[int, int] | None:
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header.removeprefix("bytes=").partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _error(status: int, code: str, extra: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()
    headers = (("Content-Type", "application/xml"), ("Content-Length", str(len(body))), *extra)
    return Answer(status, headers, body)


def _parse(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, target.split("?", 1)[0], headers)


def _encode(answer: Answer, method: str) -> bytes:
    head = f"HTTP/1.1 {answer.status} Scripted\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in answer.headers)
    if answer.close:
        head += "Connection: close\r\n"
    data = head.encode("latin-1") + b"\r\n"
    return data if method == "HEAD" else data + answer.body


# --- tampers: each one thing a real S3 never does -----------------------------------


def no_etag(request: Request, answer: Answer) -> Answer:
    return answer.without("ETag")


def no_last_modified(request: Request, answer: Answer) -> Answer:
    return answer.without("Last-Modified")


def unknown_total(request: Request, answer: Answer) -> Answer:
    """``Content-Range: bytes a-b/*`` (RFC 9110 §14.4: complete length unknown)."""
    content_range = answer.header("Content-Range")
    if answer.status != 206 or content_range is None:
        return answer
    return answer.with_header("Content-Range", content_range.rsplit("/", 1)[0] + "/*")


def ignores_range(stored_body: bytes) -> Tamper:
    """200 with the whole body to any GET, ranged or not (RFC 9110 §14.2 allows it)."""

    def tamper(request: Request, answer: Answer) -> Answer:
        if answer.status != 206:
            return answer
        whole = answer.without("Content-Range").with_header("Content-Length", str(len(stored_body)))
        return replace(whole, status=200, body=stored_body)

    return tamper


def shifted_range(stored_body: bytes) -> Tamper:
    """A 206 for the range one byte further than the one asked (its bytes honest)."""

    def tamper(request: Request, answer: Answer) -> Answer:
        content_range = answer.header("Content-Range")
        if answer.status != 206 or content_range is None:
            return answer
        span, _, total = content_range.removeprefix("bytes ").partition("/")
        first, last = (int(n) for n in span.split("-"))
        shift = 1 if last + 1 < len(stored_body) else -1
        first, last = max(0, first + shift), last + shift
        part = stored_body[first : last + 1]
        return replace(
            answer.with_header("Content-Range", f"bytes {first}-{last}/{total}").with_header(
                "Content-Length", str(len(part))
            ),
            body=part,
        )

    return tamper


def short_body(request: Request, answer: Answer) -> Answer:
    """The announced Content-Length, but the connection closes 10 bytes early."""
    if request.method == "HEAD" or answer.status not in (200, 206) or len(answer.body) < 20:
        return answer
    return replace(answer, body=answer.body[:-10], close=True)


def long_body(request: Request, answer: Answer) -> Answer:
    """The announced Content-Length, then 10 bytes more."""
    if request.method == "HEAD" or answer.status not in (200, 206):
        return answer
    return replace(answer, body=answer.body + b"0123456789", close=True)


def unframed_long_body(request: Request, answer: Answer) -> Answer:
    """No Content-Length (the body ends when the connection closes), 10 bytes more
    than its Content-Range says."""
    if request.method == "HEAD" or answer.status != 206:
        return answer
    return replace(answer.without("Content-Length"), body=answer.body + b"0123456789", close=True)


def unframed_short_body(request: Request, answer: Answer) -> Answer:
    """No Content-Length, 10 bytes fewer than its Content-Range says."""
    if request.method == "HEAD" or answer.status != 206 or len(answer.body) < 20:
        return answer
    return replace(answer.without("Content-Length"), body=answer.body[:-10], close=True)

"""No wrong byte from a non-conforming upstream (issue #15, item 2), and the
coalesced-waiters metric counts a request once (item 8).

A scripted upstream (tests/scripted_upstream.py) answers like S3 except for one thing
a test picks: no ETag, no Last-Modified, ``bytes a-b/*``, another range than asked,
200 to a ranged GET, a body shorter or longer than announced, a total that changes
between block fetches. Through s3cache, every read (boto3 and raw HTTP; whole, ranged,
HEAD, again) either gets exactly what the upstream answers that same request (status
and body), or S3's own answer for the object as it truly is (a short body resumed with
If-Match is whole again), or an aborted connection; never a complete response with
other bytes. Once the upstream behaves again, reads are right (nothing wrong was
cached).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from s3cache.s3.objectmeta import Verdict, announced_length, check_answer
from s3cache.sandbox.proxy import S3CacheProcess, client_of
from tests.scripted_upstream import (
    Answer,
    Request,
    ScriptedUpstream,
    StoredObject,
    Tamper,
    conforming_answer,
    ignores_range,
    long_body,
    no_etag,
    no_last_modified,
    shifted_range,
    short_body,
    unframed_long_body,
    unframed_short_body,
    unknown_total,
)

BLOCK = 64 * 1024
SIZE = 3 * BLOCK + 1234
BUCKET = "scripted"
ABORTED = ("aborted",)
# boto3 could not parse the answer's headers (a Last-Modified that is no date): it
# raises as it does against the upstream itself; the raw reads check those bytes.
UNREADABLE = ("unreadable",)
# s3cache's own 503 ServiceUnavailable: the upstream's answer could not be parsed as HTTP
# (aiohttp refused it), an error the client retries, never taken for object bytes.
UNAVAILABLE = ("503 ServiceUnavailable",)


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    yield server
    server.close()


@pytest.fixture
def proxy(tmp_path: Path, scripted: ScriptedUpstream) -> Iterator[S3CacheProcess]:
    with S3CacheProcess(
        tmp_path,
        scripted,
        extra_args=[
            "--block-size",
            str(BLOCK),
            "--cache-size",
            "16MiB",
            "--allow-anonymous",
            "true",
            "--upstream-retry-backoff",
            "10ms",
        ],
        debug_blocking=True,
    ) as running:
        yield running
    assert running.blocking_calls() == []


def boto(proxy: S3CacheProcess, scripted: ScriptedUpstream) -> Any:
    return client_of(proxy.endpoint_url, scripted, retries={"max_attempts": 1})


# --- reading, and what a read may give ---------------------------------------------


def raw(conn: http.client.HTTPConnection, method: str, key: str, range_: str | None) -> tuple:
    """(status, body) of one exchange on ``conn``, or ABORTED if the connection broke
    off before the response was complete."""
    headers = {"Range": range_} if range_ else {}
    try:
        conn.request(method, f"/{BUCKET}/{key}", headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError):
        conn.close()
        return ABORTED
    if method == "HEAD":
        return response.status, response.getheader("Content-Length")
    if response.status == 503 and b"<Code>ServiceUnavailable</Code>" in body:
        return UNAVAILABLE
    return response.status, body


def via_boto(client: Any, key: str, range_: str | None) -> tuple:
    extra = {"Range": range_} if range_ else {}
    try:
        answer = client.get_object(Bucket=BUCKET, Key=key, **extra)
        body = answer["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ServiceUnavailable":
            return UNAVAILABLE
        return exc.response["ResponseMetadata"]["HTTPStatusCode"], None
    except BotoCoreError:
        return ABORTED
    except ValueError:
        return UNREADABLE
    return answer["ResponseMetadata"]["HTTPStatusCode"], body


def allowed(
    scripted: ScriptedUpstream, method: str, key: str, range_: str | None, *, body: bool = True
) -> tuple[tuple, ...]:
    """What a read through s3cache may give: what the upstream itself gives this
    request, what S3 gives it for the true object, or an aborted connection."""
    request = Request(method, f"/{BUCKET}/{key}", {"range": range_} if range_ else {})
    stored = scripted.objects[request.path]
    truth = conforming_answer(StoredObject(stored.body, stored.etag), request)
    return ABORTED, UNREADABLE, UNAVAILABLE, framed(scripted.answer(request), method, body), framed(
        truth, method, body
    )


def framed(answer: Answer, method: str, body: bool) -> tuple:
    """What a client gets for ``answer``: status and body as HTTP frames it
    (Content-Length bytes, or up to the close), or ABORTED if the body ends before its
    Content-Length; for a HEAD, status and Content-Length."""
    length = answer.header("Content-Length")
    if method == "HEAD":
        return answer.status, length
    if length is not None and len(answer.body) < int(length):
        return ABORTED
    sent = answer.body if length is None else answer.body[: int(length)]
    return answer.status, sent if body else None


RANGES = [None, "bytes=100-299", f"bytes={BLOCK + 5}-{2 * BLOCK + 9}", "bytes=-50"]


def read_everything(proxy: S3CacheProcess, scripted: ScriptedUpstream, key: str) -> list[str]:
    """Every kind of read, twice; the reads whose answer was neither the upstream's
    nor an aborted connection."""
    wrong = []
    client = boto(proxy, scripted)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        for round_ in range(2):
            for range_ in RANGES:
                got = via_boto(client, key, range_)
                with_body = len(got) == 2 and got[1] is not None
                if got not in allowed(scripted, "GET", key, range_, body=with_body):
                    wrong.append(f"round {round_} boto3 GET {range_}: {_short(got)}")
                for method in ("GET", "HEAD"):
                    got = raw(conn, method, key, range_)
                    if got not in allowed(scripted, method, key, range_):
                        wrong.append(f"round {round_} raw {method} {range_}: {_short(got)}")
    finally:
        conn.close()
        client.close()
    return wrong


def _short(outcome: tuple) -> str:
    if len(outcome) == 1:
        return str(outcome[0])
    status, body = outcome
    return f"{status} with {len(body) if isinstance(body, bytes) else body!r} bytes"


def right_after_repair(
    proxy: S3CacheProcess, scripted: ScriptedUpstream, key: str, body: bytes
) -> list[str]:
    """With the upstream conforming again, every read is exactly S3's answer."""
    scripted.objects[f"/{BUCKET}/{key}"].tamper = None
    stored = StoredObject(body, scripted.objects[f"/{BUCKET}/{key}"].etag)
    wrong = []
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        for range_ in RANGES:
            asked = Request("GET", "", {"range": range_} if range_ else {})
            expected = conforming_answer(stored, asked)
            got = raw(conn, "GET", key, range_)
            if got != (expected.status, expected.body):
                wrong.append(f"repaired GET {range_}: {_short(got)}")
    finally:
        conn.close()
    return wrong


def both(*tampers: Tamper) -> Tamper:
    def tamper(request: Request, answer: Answer) -> Answer:
        for one in tampers:
            answer = one(request, answer)
        return answer

    return tamper


CASES = {
    "no-etag": lambda body: no_etag,
    "no-last-modified": lambda body: no_last_modified,
    "unparseable-last-modified": lambda body: lambda request, answer: answer.with_header(
        "Last-Modified", "yesterday"
    ),
    "unknown-total": lambda body: unknown_total,
    "other-range": shifted_range,
    "200-to-a-range": ignores_range,
    "short-body": lambda body: short_body,
    "long-body": lambda body: long_body,
    "unframed-long-body": lambda body: unframed_long_body,
    "unframed-short-body": lambda body: unframed_short_body,
    "long-body-kept-alive": lambda body: lambda request, answer: replace(
        long_body(request, answer), close=False
    ),
    "no-etag-short-body": lambda body: both(no_etag, short_body),
    "no-etag-unframed-long-body": lambda body: both(no_etag, unframed_long_body),
    "unknown-total-unframed-short-body": lambda body: both(unknown_total, unframed_short_body),
    "content-length-off": lambda body: lambda request, answer: (
        answer.with_header("Content-Length", str(len(answer.body) - 7))
        if answer.status == 206
        else answer
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_wrong_byte_from_a_nonconforming_upstream(
    proxy: S3CacheProcess, scripted: ScriptedUpstream, case: str
) -> None:
    body = os.urandom(SIZE)
    scripted.put(BUCKET, "object", body, tamper=CASES[case](body))
    wrong = read_everything(proxy, scripted, "object")
    assert not wrong, "\n".join(wrong)
    wrong = right_after_repair(proxy, scripted, "object", body)
    assert not wrong, "\n".join(wrong)


def test_a_total_that_changes_between_block_fetches(
    proxy: S3CacheProcess, scripted: ScriptedUpstream
) -> None:
    """The object is replaced by a longer one, same ETag, after the first block came
    (an upstream whose ETags and If-Match mean nothing): a response is one version,
    whole, or it is aborted."""
    old, new = os.urandom(SIZE), os.urandom(SIZE + BLOCK)
    scripted.put(BUCKET, "grows", old)
    stored = scripted.objects[f"/{BUCKET}/grows"]
    replaced = replace(stored, body=new)
    answered = threading.Event()

    def after_the_first_get(request: Request, answer: Answer) -> Answer:
        if request.method != "GET":
            return answer
        if answered.is_set():
            return conforming_answer(replaced, request)
        answered.set()
        return answer

    stored.tamper = after_the_first_get
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        outcomes = [raw(conn, "GET", "grows", None) for _ in range(3)]
    finally:
        conn.close()
    for outcome in outcomes:
        assert outcome in (ABORTED, (200, old), (200, new)), _short(outcome)
    assert right_after_repair(proxy, scripted, "grows", new) == []


def logged(proxy: S3CacheProcess, text: str) -> bool:
    """Whether s3cache logged ``text`` (its log lines are written by a thread: wait
    for them a little)."""
    deadline = time.monotonic() + 10
    while text not in proxy.log_tail(400):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_uncached_stream_is_checked_too(
    proxy: S3CacheProcess, scripted: ScriptedUpstream
) -> None:
    """A cache full of blocks in use (a hit that a client is slow to take keeps its
    entry pinned) streams the rest of an object straight from the upstream; an answer
    for another range than that stream asked is not relayed."""
    big = os.urandom(12 * 1024 * 1024)  # more than the sockets' buffers can take
    scripted.put(BUCKET, "pinned", big)
    client = boto(proxy, scripted)
    assert client.get_object(Bucket=BUCKET, Key="pinned")["Body"].read() == big
    client.close()
    body = os.urandom(8 * 1024 * 1024)  # 12 + 8 MiB > the 16 MiB cache
    shift = shifted_range(body)

    def uncached_stream_shifted(request: Request, answer: Answer) -> Answer:
        # Block fetches ask one block; only the uncached stream asks for more.
        first, _, last = (request.range or "bytes=0-0").removeprefix("bytes=").partition("-")
        return shift(request, answer) if int(last or 0) - int(first or 0) >= BLOCK else answer

    scripted.put(BUCKET, "object", body, tamper=uncached_stream_shifted)
    slow = socket.create_connection(("127.0.0.1", proxy.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        slow.sendall(f"GET /{BUCKET}/pinned HTTP/1.1\r\nHost: s3cache\r\n\r\n".encode())
        assert slow.recv(1, socket.MSG_PEEK)  # its answer has begun: the entry is pinned
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        got = raw(conn, "GET", "object", None)
        conn.close()
    finally:
        slow.close()
    assert got in (ABORTED, (200, body)), _short(got)
    assert logged(proxy, "uncached stream failed")  # the path under test ran


# --- item 8: s3cache_coalesced_waiters_total -------------------------------------------


def coalesced(proxy: S3CacheProcess) -> float:
    with urllib.request.urlopen(f"{proxy.endpoint_url}/_s3cache/metrics") as answer:
        text = answer.read().decode()
    match = re.search(r"^s3cache_coalesced_waiters_total (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def test_one_cold_get_coalesces_with_nobody(
    proxy: S3CacheProcess, scripted: ScriptedUpstream
) -> None:
    body = os.urandom(12 * BLOCK + 5)  # several blocks, fetched in parallel ahead
    scripted.put(BUCKET, "alone", body)
    before = coalesced(proxy)
    client = boto(proxy, scripted)
    assert client.get_object(Bucket=BUCKET, Key="alone")["Body"].read() == body
    client.close()
    assert len(scripted.received("GET")) > 2  # the read-ahead did run
    assert coalesced(proxy) - before == 0


def test_concurrent_cold_gets_count_each_joiner_once(
    proxy: S3CacheProcess, scripted: ScriptedUpstream
) -> None:
    readers = 6
    body = os.urandom(12 * BLOCK + 5)
    scripted.put(BUCKET, "shared", body)
    before = coalesced(proxy)
    barrier = threading.Barrier(readers)

    def read(_: int) -> bytes:
        client = boto(proxy, scripted)
        barrier.wait()
        data: bytes = client.get_object(Bucket=BUCKET, Key="shared")["Body"].read()
        client.close()
        return data

    with ThreadPoolExecutor(readers) as pool:
        assert all(data == body for data in pool.map(read, range(readers)))
    assert coalesced(proxy) - before <= readers - 1


# --- the check itself (s3/objectmeta: no I/O) ---------------------------------------

S3_HEAD = {"ETag": '"e"', "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}


def ranged(content_range: str, length: str | None, **extra: str) -> dict[str, str]:
    headers = {**S3_HEAD, "Content-Range": content_range, **extra}
    if length is not None:
        headers["Content-Length"] = length
    return headers


@pytest.mark.parametrize(
    ("status", "headers", "asked", "verdict"),
    [
        (206, ranged("bytes 0-9/100", "10"), (0, 9), Verdict.CACHEABLE),
        (206, ranged("bytes 0-9/100", None), (0, 9), Verdict.CACHEABLE),  # chunked
        (206, ranged("bytes 90-99/100", "10"), (90, 199), Verdict.CACHEABLE),  # clipped
        (200, {**S3_HEAD, "Content-Length": "10"}, (0, 99), Verdict.CACHEABLE),  # all of it
        (200, {**S3_HEAD, "Content-Length": "0"}, (0, 99), Verdict.CACHEABLE),  # empty
        (200, {**S3_HEAD, "Content-Length": "100"}, (0, 9), Verdict.UNCACHED),
        (206, ranged("bytes 0-9/*", "10"), (0, 9), Verdict.UNCACHED),
        (206, {**ranged("bytes 0-9/100", "10"), "ETag": ""}, (0, 9), Verdict.UNCACHED),
        (206, ranged("bytes 0-9/100", "10", **{"Last-Modified": "soon"}), (0, 9), Verdict.UNCACHED),
        (206, ranged("bytes 1-10/100", "10"), (0, 9), Verdict.BROKEN),
        (206, ranged("bytes 0-4/100", "5"), (0, 9), Verdict.BROKEN),
        (206, ranged("bytes 0-9/100", "12"), (0, 9), Verdict.BROKEN),
        (206, ranged("bytes 0-9/5", "10"), (0, 9), Verdict.BROKEN),
        (206, ranged("bytes 9-0/100", "10"), (0, 9), Verdict.BROKEN),
        (206, ranged("bytes 0-9/100", "ten"), (0, 9), Verdict.BROKEN),
        (206, {**S3_HEAD, "Content-Length": "10"}, (0, 9), Verdict.BROKEN),
    ],
)
def test_check_answer(
    status: int, headers: dict[str, str], asked: tuple[int, int], verdict: Verdict
) -> None:
    assert check_answer("GET", status, headers, asked).verdict is verdict


def test_check_answer_against_the_entry() -> None:
    known = check_answer("GET", 206, ranged("bytes 0-9/100", "10"), (0, 9)).meta
    assert known is not None and known.size == 100 and known.etag == '"e"'
    same = check_answer("GET", 206, ranged("bytes 50-59/100", "10"), (50, 59), known)
    assert same.verdict is Verdict.CACHEABLE
    longer = ranged("bytes 50-59/101", "10")
    assert check_answer("GET", 206, longer, (50, 59), known).verdict is Verdict.CHANGED
    other = {**ranged("bytes 50-59/100", "10"), "ETag": '"f"'}
    assert check_answer("GET", 206, other, (50, 59), known).verdict is Verdict.CHANGED
    head = check_answer("HEAD", 200, {**S3_HEAD, "Content-Length": "100"}, None)
    assert head.verdict is Verdict.CACHEABLE and head.meta == known
    assert check_answer("HEAD", 200, S3_HEAD, None).verdict is Verdict.UNCACHED  # size?


def test_announced_length() -> None:
    assert announced_length(206, {"Content-Range": "bytes 5-14/100"}) == 10
    assert announced_length(206, {"Content-Range": "bytes 5-14/*"}) == 10
    assert announced_length(200, {"Content-Length": "7"}) == 7
    assert announced_length(200, {}) is None
    assert announced_length(304, {"Content-Length": "1000"}) is None
    with pytest.raises(ValueError):
        announced_length(206, {"Content-Range": "bytes 5-14/100", "Content-Length": "9"})

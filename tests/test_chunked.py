"""Tests for s3cache.s3.chunked, the sans-I/O aws-chunked body decoder."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from s3cache.s3.chunked import AwsChunkedDecoder, AwsChunkedError, HashLike

SIG = "f" * 64  # a well-formed, meaningless chunk signature


def encode(
    payload: bytes,
    sizes: Sequence[int],
    *,
    signed: bool = False,
    trailers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """aws-chunked encoding of payload, in chunks of sizes (cycled), by hand."""
    ext = f";chunk-signature={SIG}".encode() if signed else b""
    out = bytearray()
    pos, i = 0, 0
    while pos < len(payload):
        n = max(1, sizes[i % len(sizes)]) if sizes else len(payload)
        data = payload[pos : pos + n]
        out += b"%x%s\r\n%s\r\n" % (len(data), ext, data)
        pos += len(data)
        i += 1
    out += b"0%s\r\n" % ext
    for name, value in trailers:
        out += f"{name}:{value}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def split(stream: bytes, step: int) -> Iterator[bytes]:
    return (stream[i : i + step] for i in range(0, len(stream), step))


def decode(
    pieces: Iterator[bytes] | Sequence[bytes],
    max_chunk_header: int = 4096,
    max_trailer_bytes: int = 16384,
) -> tuple[bytes, AwsChunkedDecoder]:
    """Feed all pieces, finish, and check the invariants every decode must hold."""
    dec = AwsChunkedDecoder(max_chunk_header=max_chunk_header, max_trailer_bytes=max_trailer_bytes)
    out = [piece for data in pieces for piece in dec.feed(data)]
    dec.finish()
    assert all(type(piece) is bytes for piece in out)
    payload = b"".join(out)
    assert dec.done
    assert dec.total_decoded == len(payload)
    return payload, dec


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# --- valid bodies ---------------------------------------------------------------------

VALID = [
    # id, body, payload, trailers
    ("unsigned-empty", b"0\r\n\r\n", b"", {}),
    ("unsigned-one", b"5\r\nhello\r\n0\r\n\r\n", b"hello", {}),
    (
        "unsigned-crc32-trailer",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n",
        b"hello world",
        {"x-amz-checksum-crc32": "DUoRhQ=="},
    ),
    (
        "trailer-ows-and-case",
        b"1\r\nx\r\n0\r\nX-Amz-Checksum-SHA256: \t abc= \t\r\nx-amz-meta:\r\n\r\n",
        b"x",
        {"x-amz-checksum-sha256": "abc=", "x-amz-meta": ""},
    ),
    ("hex-size-upper-and-zero-padded", b"00A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", {}),
    (
        "data-looks-like-framing",
        b"c\r\n0\r\n\r\n0\r\n\r\n\r\n\r\n0\r\n\r\n",
        b"0\r\n\r\n0\r\n\r\n\r\n",
        {},
    ),
    (
        "signed",
        f"3;chunk-signature={SIG}\r\nabc\r\n0;chunk-signature={SIG}\r\n\r\n".encode(),
        b"abc",
        {},
    ),
    (
        "signed-trailer",
        (
            f"3;chunk-signature={SIG}\r\nabc\r\n0;chunk-signature={SIG}\r\n"
            f"x-amz-checksum-crc32:{crc32_b64(b'abc')}\r\nx-amz-trailer-signature:{SIG}\r\n\r\n"
        ).encode(),
        b"abc",
        {"x-amz-checksum-crc32": crc32_b64(b"abc"), "x-amz-trailer-signature": SIG},
    ),
    (
        "signed-sigv4a-length-signature",
        f"1;chunk-signature={'ab' * 71}\r\nz\r\n0;chunk-signature={'cd' * 70}\r\n\r\n".encode(),
        b"z",
        {},
    ),
]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1 << 20])
@pytest.mark.parametrize(
    ("body", "payload", "trailers"), [v[1:] for v in VALID], ids=[v[0] for v in VALID]
)
def test_valid_bodies(body: bytes, payload: bytes, trailers: dict[str, str], step: int) -> None:
    got, dec = decode(split(body, step))
    assert got == payload
    assert dec.trailers == trailers
    assert list(dec.trailers) == list(trailers)  # wire order


def test_crc32_in_table_is_the_real_crc32() -> None:
    assert crc32_b64(b"hello world") == "DUoRhQ=="


def test_accepts_bytearray_and_memoryview() -> None:
    dec = AwsChunkedDecoder()
    out = dec.feed(bytearray(b"3\r\nab")) + dec.feed(memoryview(b"c\r\n0\r\n\r\n"))
    dec.finish()
    assert out == [b"ab", b"c"]
    assert all(type(piece) is bytes for piece in out)


def test_empty_feed_is_a_no_op() -> None:
    dec = AwsChunkedDecoder()
    assert dec.feed(b"") == []
    assert not dec.done
    dec.feed(b"0\r\n\r\n")
    assert dec.feed(b"") == []
    dec.finish()


# --- botocore's real encoder ----------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, 64 * 1024, 1024 * 1024])
@pytest.mark.parametrize("length", [0, 1, 999, 1000, 1001, 200_003])
def test_botocore_unsigned_trailer_crc32(chunk_size: int, length: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(length))
    wrapper = AwsChunkedWrapper(
        io.BytesIO(payload),
        checksum_cls=Crc32Checksum,
        checksum_name="x-amz-checksum-crc32",
        chunk_size=chunk_size,
    )
    pieces = iter(lambda: wrapper.read(4099), b"")
    got, dec = decode(pieces)
    assert got == payload
    assert dec.trailers == {"x-amz-checksum-crc32": crc32_b64(payload)}


def test_botocore_without_checksum() -> None:
    wrapper = AwsChunkedWrapper(io.BytesIO(b"x" * 2500), chunk_size=1000)
    got, dec = decode(list(wrapper))
    assert got == b"x" * 2500
    assert dec.trailers == {}


# --- the AWS documentation example (sigv4-streaming, "Example: PUT Object") ------------

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SEED_SIGNATURE = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
DOC_CHUNKS = [
    (65536, "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"),
    (1024, "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"),
    (0, "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"),
]
DOC_BODY = b"".join(
    b"%x;chunk-signature=%s\r\n%s\r\n" % (n, sig.encode(), b"a" * n) for n, sig in DOC_CHUNKS
)


def test_aws_doc_example_structure() -> None:
    assert len(DOC_BODY) == 66824  # the example's Content-Length
    assert DOC_BODY.startswith(b"10000;chunk-signature=ad80c730")
    assert b"\r\n400;chunk-signature=0055627c" in DOC_BODY
    assert DOC_BODY.endswith(b"\r\n0;chunk-signature=" + DOC_CHUNKS[2][1].encode() + b"\r\n\r\n")


@pytest.mark.parametrize("step", [1, 4096, 65536, 70000])
def test_aws_doc_example_decodes_and_chunk_signatures_verify(step: int) -> None:
    """The hasher hook is enough to verify the documented SigV4 chunk signature chain."""
    key = b"AWS4" + SECRET.encode()
    for part in ("20130524", "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    previous = [SEED_SIGNATURE]
    seen: list[str | None] = []

    def verify(signature: str | None, hasher: HashLike) -> None:
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                "20130524T000000Z",
                "20130524/us-east-1/s3/aws4_request",
                previous[-1],
                hashlib.sha256(b"").hexdigest(),
                hasher.hexdigest(),
            ]
        )
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        assert signature == expected
        seen.append(signature)
        previous.append(expected)

    dec = AwsChunkedDecoder(chunk_hasher_factory=hashlib.sha256, on_chunk_end=verify)
    payload = b"".join(piece for data in split(DOC_BODY, step) for piece in dec.feed(data))
    dec.finish()
    assert payload == b"a" * 66560
    assert dec.total_decoded == 66560
    assert seen == [sig for _, sig in DOC_CHUNKS]
    assert dec.trailers == {}


# --- hook and copy behaviour ----------------------------------------------------------


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_hasher_sees_each_chunk_once_unsigned(step: int) -> None:
    payload = bytes(range(256)) * 10
    body = encode(payload, [700, 1, 300], trailers=[("x-amz-checksum-crc32", crc32_b64(payload))])
    calls: list[tuple[str | None, str]] = []
    dec = AwsChunkedDecoder(
        chunk_hasher_factory=hashlib.sha256,
        on_chunk_end=lambda sig, h: calls.append((sig, h.hexdigest())),
    )
    for data in split(body, step):
        dec.feed(data)
    dec.finish()
    sizes = [700, 1, 300, 700, 1, 300, 558, 0]  # 2560 bytes, then the last chunk
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    expected = [
        hashlib.sha256(payload[o : o + n]).hexdigest() for o, n in zip(offsets, sizes, strict=True)
    ]
    assert calls == [(None, digest) for digest in expected]


def test_hook_requires_both_arguments() -> None:
    with pytest.raises(ValueError, match="both"):
        AwsChunkedDecoder(chunk_hasher_factory=hashlib.sha256)
    with pytest.raises(ValueError, match="both"):
        AwsChunkedDecoder(on_chunk_end=lambda sig, h: None)
    with pytest.raises(ValueError, match="too small"):
        AwsChunkedDecoder(max_chunk_header=2)


def test_large_chunk_is_not_copied_more_than_once() -> None:
    data = bytes(1 << 20)
    header, tail = (
        b"100000;chunk-signature=%s\r\n" % SIG.encode(),
        b"\r\n0;chunk-signature=%s\r\n\r\n" % SIG.encode(),
    )
    dec = AwsChunkedDecoder()
    assert dec.feed(header) == []
    [out] = dec.feed(data)
    assert out is data  # a feed that is all chunk data comes back as is: zero copies
    assert dec.feed(tail) == []
    dec.finish()

    dec = AwsChunkedDecoder()
    pieces = dec.feed(header + data + tail)  # one slice: a single copy
    assert len(pieces) == 1
    assert pieces[0] == data
    dec.finish()


def test_no_slots_dict() -> None:
    assert not hasattr(AwsChunkedDecoder(), "__dict__")


# --- errors ---------------------------------------------------------------------------

ERRORS = [
    # id, body, message regex, decoder kwargs
    ("size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n", "malformed chunk header", {}),
    ("size-0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk header", {}),
    ("size-signed", b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk header", {}),
    ("size-underscore", b"1_0\r\n", "malformed chunk header", {}),
    ("size-space", b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk header", {}),
    ("size-empty", b"\r\n", "malformed chunk header", {}),
    ("size-17-digits", b"1" * 17 + b"\r\n", "malformed chunk header", {}),
    ("size-bare-lf", b"5\nhello\r\n0\r\n\r\n", "malformed chunk header", {}),
    ("empty-signature", b"5;chunk-signature=\r\nhello\r\n", "malformed chunk header", {}),
    ("signature-not-hex", b"5;chunk-signature=xyz\r\nhello\r\n", "malformed chunk header", {}),
    ("unknown-extension", b"5;foo=bar\r\nhello\r\n", "malformed chunk header", {}),
    ("header-too-long", b"1" * 5000, "chunk header over 4096 bytes", {}),
    (
        "header-too-long-small-limit",
        b"5;chunk-signature=" + b"a" * 64 + b"\r\n",
        "chunk header over 32",
        {"max_chunk_header": 32},
    ),
    ("data-crlf-wrong", b"3\r\nabcX\r\n0\r\n\r\n", "missing CRLF after chunk data", {}),
    ("data-crlf-half", b"3\r\nabc\rX0\r\n\r\n", "missing CRLF after chunk data", {}),
    ("data-crlf-reversed", b"3\r\nabc\n\r0\r\n\r\n", "missing CRLF after chunk data", {}),
    ("data-longer-than-size", b"3\r\nabcd\r\n0\r\n\r\n", "missing CRLF after chunk data", {}),
    (
        "trailers-too-big",
        b"0\r\n" + b"x-amz-meta-a:" + b"v" * 20000 + b"\r\n\r\n",
        "trailers over 16384 bytes",
        {},
    ),
    (
        "trailers-too-many",
        b"0\r\n" + b"".join(b"a%d:b\r\n" % i for i in range(10)) + b"\r\n",
        "trailers over 40 bytes",
        {"max_trailer_bytes": 40},
    ),
    ("trailer-no-colon", b"0\r\nx-amz-checksum-crc32 AAAA\r\n\r\n", "malformed trailer line", {}),
    ("trailer-empty-name", b"0\r\n:AAAA\r\n\r\n", "malformed trailer line", {}),
    ("trailer-space-in-name", b"0\r\nx amz:AAAA\r\n\r\n", "malformed trailer line", {}),
    ("trailer-space-before-colon", b"0\r\nx-amz :AAAA\r\n\r\n", "malformed trailer line", {}),
    ("trailer-non-ascii", b"0\r\nx-amz:caf\xc3\xa9\r\n\r\n", "malformed trailer line", {}),
    ("trailer-control-char", b"0\r\nx-amz:a\x00b\r\n\r\n", "malformed trailer line", {}),
    ("trailer-bare-lf", b"0\r\nx-amz:a\nb:c\r\n\r\n", "malformed trailer line", {}),
    ("trailer-duplicate", b"0\r\na:1\r\nA:2\r\n\r\n", "duplicate trailer", {}),
    (
        "signed-then-unsigned",
        f"1;chunk-signature={SIG}\r\na\r\n0\r\n\r\n".encode(),
        "some chunks",
        {},
    ),
    (
        "unsigned-then-signed",
        f"1\r\na\r\n0;chunk-signature={SIG}\r\n\r\n".encode(),
        "some chunks",
        {},
    ),
    ("data-after-end", b"0\r\n\r\nX", "data after the end", {}),
    ("second-body-after-end", b"0\r\n\r\n0\r\n\r\n", "data after the end", {}),
]


@pytest.mark.parametrize("step", [1, 3, 1 << 20])
@pytest.mark.parametrize(
    ("body", "message", "kwargs"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(body: bytes, message: str, kwargs: dict[str, Any], step: int) -> None:
    dec = AwsChunkedDecoder(**kwargs)
    with pytest.raises(AwsChunkedError, match=message):
        for data in split(body, step):
            dec.feed(data)
        dec.finish()
    with pytest.raises(AwsChunkedError, match="already failed"):
        dec.feed(b"0\r\n\r\n")
    assert not dec.done


def test_error_is_a_value_error() -> None:
    assert issubclass(AwsChunkedError, ValueError)


def test_data_after_end_in_a_later_feed() -> None:
    dec = AwsChunkedDecoder()
    dec.feed(b"0\r\n\r\n")
    assert dec.done
    with pytest.raises(AwsChunkedError, match="data after the end"):
        dec.feed(b"\r\n")


BOUNDARY_BODY = encode(b"hello", [5], signed=True, trailers=[("x-amz-checksum-crc32", "AAAAAA==")])


@pytest.mark.parametrize("step", [1, 1 << 20])
def test_limits_are_inclusive(step: int) -> None:
    header = len(f"5;chunk-signature={SIG}\r\n")
    trailers = len("x-amz-checksum-crc32:AAAAAA==\r\n\r\n")
    got, dec = decode(
        split(BOUNDARY_BODY, step), max_chunk_header=header, max_trailer_bytes=trailers
    )
    assert got == b"hello"
    with pytest.raises(AwsChunkedError, match="chunk header over"):
        decode(split(BOUNDARY_BODY, step), max_chunk_header=header - 1)
    with pytest.raises(AwsChunkedError, match="trailers over"):
        decode(split(BOUNDARY_BODY, step), max_trailer_bytes=trailers - 1)


@pytest.mark.parametrize("cut", range(len(BOUNDARY_BODY)))
def test_finish_on_every_truncation(cut: int) -> None:
    dec = AwsChunkedDecoder()
    dec.feed(BOUNDARY_BODY[:cut])
    assert not dec.done
    with pytest.raises(AwsChunkedError, match="ended before the final chunk"):
        dec.finish()


# --- property -------------------------------------------------------------------------

trailer_names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
trailer_values = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True) | st.just("")


@settings(deadline=None)
@given(
    payload=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=8),
    signed=st.booleans(),
    trailers=st.dictionaries(trailer_names, trailer_values, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_property_any_split_roundtrips(
    payload: bytes, sizes: list[int], signed: bool, trailers: dict[str, str], cuts: list[int]
) -> None:
    body = encode(payload, sizes, signed=signed, trailers=list(trailers.items()))
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in zip(points, points[1:], strict=False)]
    got, dec = decode(pieces)
    assert got == payload
    assert dec.trailers == trailers


@settings(deadline=None)
@given(
    payload=st.binary(max_size=5000),
    chunk_size=st.integers(1, 2000),
    read_size=st.integers(1, 3000),
)
def test_property_botocore_roundtrips(payload: bytes, chunk_size: int, read_size: int) -> None:
    wrapper = AwsChunkedWrapper(
        io.BytesIO(payload),
        checksum_cls=Crc32Checksum,
        checksum_name="x-amz-checksum-crc32",
        chunk_size=chunk_size,
    )
    got, dec = decode(iter(lambda: wrapper.read(read_size), b""))
    assert got == payload
    assert dec.trailers == {"x-amz-checksum-crc32": crc32_b64(payload)}

"""Incremental (sans-I/O) decoder for ``Content-Encoding: aws-chunked`` request bodies.

This is the body framing of SigV4 streaming uploads, as described in the AWS S3 API
reference pages "Signature Calculations for the Authorization Header: Transferring
Payload in Multiple Chunks (Chunked Upload) (AWS Signature Version 4)"
(``sigv4-streaming``) and "Signature calculations for trailing headers (chunked
uploads)" (``sigv4-streaming-trailers``), and as produced by botocore's
``botocore.httpchecksum.AwsChunkedWrapper``.  Grammar (all line ends are CRLF)::

    body         = *data-chunk last-chunk *trailer CRLF
    data-chunk   = chunk-header chunk-data CRLF      ; chunk-size > 0
    last-chunk   = "0" [ chunk-sig ] CRLF
    chunk-header = chunk-size [ chunk-sig ] CRLF
    chunk-size   = 1*16HEXDIG                         ; length of chunk-data
    chunk-sig    = ";chunk-signature=" 1*HEXDIG
    trailer      = field-name ":" OWS field-value OWS CRLF

It covers, per ``x-amz-content-sha256``:

* ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``: signed chunks, no trailers, so the body ends
  ``0;chunk-signature=<sig>\\r\\n\\r\\n``;
* ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER``: signed chunks, then trailers such as
  ``x-amz-checksum-crc32:<b64>`` and a final ``x-amz-trailer-signature:<sig>``;
* ``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` (current boto3 default): unsigned chunks
  ``<hex-size>\\r\\n<data>\\r\\n``, then ``0\\r\\n``, trailers and an empty line.

Either all chunks carry a signature or none does.  The decoder only frames: it does not
verify signatures or checksums.  A verifier plugs in through ``chunk_hasher_factory``
and ``on_chunk_end``: each chunk's data (including the empty last chunk) is fed to a
fresh hasher, which is handed to ``on_chunk_end`` with that chunk's signature (``None``
for unsigned chunks) once the chunk is complete, so nothing is buffered.  Trailers
(names lower-cased, in wire order, ``x-amz-trailer-signature`` included) are available
from ``trailers`` once ``done``.  Every framing problem raises ``AwsChunkedError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

__all__ = ["AwsChunkedDecoder", "AwsChunkedError", "HashLike"]


class AwsChunkedError(ValueError):
    """The body is not valid aws-chunked encoding (maps to an S3 400 error)."""


class HashLike(Protocol):
    """What ``chunk_hasher_factory`` must return, e.g. ``hashlib.sha256``."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;chunk-signature=([0-9A-Fa-f]+))?")
_TRAILER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\t]*?)[ \t]*")

# Parser states.
_HEADER, _DATA, _DATA_CRLF, _TRAILERS, _DONE, _FAILED = range(6)


class AwsChunkedDecoder:
    """Feed it the raw body in pieces of any size; it returns the decoded payload."""

    __slots__ = (
        "_buf",
        "_hasher",
        "_hasher_factory",
        "_max_chunk_header",
        "_max_trailer_bytes",
        "_on_chunk_end",
        "_remaining",
        "_signature",
        "_signed",
        "_state",
        "_total",
        "_trailer_bytes",
        "_trailers",
    )

    def __init__(
        self,
        *,
        max_chunk_header: int = 4096,
        max_trailer_bytes: int = 16384,
        chunk_hasher_factory: Callable[[], HashLike] | None = None,
        on_chunk_end: Callable[[str | None, HashLike], None] | None = None,
    ) -> None:
        """``max_*`` bound one chunk-header line and the whole trailer section (CRLFs
        included).  ``chunk_hasher_factory`` and ``on_chunk_end`` go together."""
        if max_chunk_header < 3 or max_trailer_bytes < 2:
            raise ValueError("limits too small for the smallest valid body")
        if (chunk_hasher_factory is None) != (on_chunk_end is None):
            raise ValueError("pass both chunk_hasher_factory and on_chunk_end, or neither")
        self._max_chunk_header = max_chunk_header
        self._max_trailer_bytes = max_trailer_bytes
        self._hasher_factory = chunk_hasher_factory
        self._on_chunk_end = on_chunk_end
        self._buf = bytearray()  # partial line (or partial CRLF) across feed() calls
        self._state = _HEADER
        self._remaining = 0  # data bytes still due in the current chunk
        self._signature: str | None = None  # of the current chunk
        self._signed: bool | None = None  # whether chunks carry signatures; first decides
        self._hasher: HashLike | None = None
        self._total = 0
        self._trailer_bytes = 0
        self._trailers: dict[str, str] = {}

    @property
    def done(self) -> bool:
        """True once the last chunk and the trailer section are complete."""
        return self._state == _DONE

    @property
    def trailers(self) -> dict[str, str]:
        """Trailer fields seen so far (a copy), lower-case names, in wire order."""
        return dict(self._trailers)

    @property
    def total_decoded(self) -> int:
        """Payload bytes returned by ``feed`` so far."""
        return self._total

    def finish(self) -> None:
        """Declare the end of the body; raises ``AwsChunkedError`` if it is incomplete."""
        if self._state != _DONE:
            raise AwsChunkedError("aws-chunked body ended before the final chunk and trailers")

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume the next piece of the body; return the payload pieces it completes.

        A piece of chunk data is returned as ``data`` itself when it spans all of it,
        else as one slice (one copy).
        """
        if self._state == _FAILED:
            raise AwsChunkedError("aws-chunked decoder already failed")
        try:
            return self._feed(bytes(data) if type(data) is not bytes else data)
        except AwsChunkedError:
            self._state = _FAILED
            raise

    def _feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._state == _HEADER:
                limit = self._max_chunk_header
                line, pos = self._take_line(data, pos, limit, f"chunk header over {limit} bytes")
                if line is not None:
                    self._start_chunk(line)
            elif self._state == _DATA:
                n = min(self._remaining, end - pos)
                piece = data if n == end else data[pos : pos + n]
                pos += n
                self._remaining -= n
                self._total += n
                if self._hasher is not None:
                    self._hasher.update(piece)
                out.append(piece)
                if not self._remaining:
                    self._state = _DATA_CRLF
            elif self._state == _DATA_CRLF:
                piece = data[pos : pos + 2 - len(self._buf)]
                pos += len(piece)
                self._buf += piece
                if self._buf != b"\r\n"[: len(self._buf)]:
                    raise AwsChunkedError("missing CRLF after chunk data")
                if len(self._buf) == 2:
                    self._buf.clear()
                    self._end_chunk()
                    self._state = _HEADER
            elif self._state == _TRAILERS:
                limit = self._max_trailer_bytes - self._trailer_bytes
                too_long = f"trailers over {self._max_trailer_bytes} bytes"
                line, pos = self._take_line(data, pos, limit, too_long)
                if line is not None:
                    self._trailer_bytes += len(line) + 2
                    self._add_trailer(line)
            else:
                raise AwsChunkedError("data after the end of the aws-chunked body")
        return out

    def _take_line(
        self, data: bytes, pos: int, limit: int, too_long: str
    ) -> tuple[bytes | None, int]:
        """Return (line without CRLF, new pos), or (None, pos) if no CRLF yet.

        The line including its CRLF may be at most ``limit`` bytes long.
        """
        buf = self._buf
        if buf.endswith(b"\r") and data.startswith(b"\n", pos):  # CRLF split across feeds
            line = bytes(buf[:-1])
            buf.clear()
            return line, pos + 1
        room = limit - len(buf)
        crlf = data.find(b"\r\n", pos, pos + room)
        if crlf >= 0:
            line = bytes(buf) + data[pos:crlf]
            buf.clear()
            return line, crlf + 2
        taken = data[pos : pos + room]
        buf += taken
        if len(buf) >= limit:
            raise AwsChunkedError(too_long)
        return None, pos + len(taken)

    def _start_chunk(self, line: bytes) -> None:
        match = _CHUNK_HEADER.fullmatch(line)
        if match is None:
            raise AwsChunkedError(f"malformed chunk header {line[:80]!r}")
        size = int(match[1], 16)
        signed = match[2] is not None
        if self._signed is None:
            self._signed = signed
        elif signed != self._signed:
            raise AwsChunkedError("chunk-signature present on some chunks but not others")
        self._signature = match[2].decode("ascii") if signed else None
        if self._hasher_factory is not None:
            self._hasher = self._hasher_factory()
        if size:
            self._remaining = size
            self._state = _DATA
        else:  # last chunk: no data and no data CRLF; trailers (or the empty line) follow
            self._end_chunk()
            self._state = _TRAILERS

    def _end_chunk(self) -> None:
        if self._on_chunk_end is not None and self._hasher is not None:
            self._on_chunk_end(self._signature, self._hasher)
        self._hasher = None

    def _add_trailer(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        match = _TRAILER.fullmatch(line)
        if match is None:
            raise AwsChunkedError(f"malformed trailer line {line[:80]!r}")
        name = match[1].decode("ascii").lower()
        if name in self._trailers:
            raise AwsChunkedError(f"duplicate trailer {name!r}")
        self._trailers[name] = match[2].decode("ascii")

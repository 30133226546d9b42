"""The ``Range`` header of a GetObject or HeadObject request, resolved as Amazon S3 does.

S3 serves one byte range per request and is more forgiving than RFC 9110 §14: a Range
it cannot parse, or one it does not support, is ignored and the whole object comes back
with 200. Only a well-formed single range that starts at or past the end of the object,
or a zero-length suffix (``bytes=-0``), is refused with 416 ``InvalidRange``.
https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html (Range)

How S3 treats each form (status for a 10-byte object; ``-`` means "ignored, 200 whole"):

    bytes=0-8      206 0-8          bytes=1-0     -   (first > last: RFC 9110 §14.1.1
    bytes=1-       206 1-9                              calls it invalid, S3 ignores it)
    bytes=-2       206 8-9          bytes=15-1    -   (even though 15 >= size)
    bytes=-15      206 0-9          bytes=0--1    -
    bytes=0-100    206 0-9          bytes=-1-     -
    bytes=100-200  416              bytes=-       -
    bytes=-0       416              0-1           -   (no unit)
    bytes=0-1,3-4  -   (several ranges: "S3 doesn't support retrieving multiple ranges")

On a 0-byte object every ``bytes=a-`` / ``bytes=a-b`` is 416, and so is ``bytes=-0``, but
``bytes=-n`` is ignored (S3 answers 200 with the empty body; readers of a file's tail rely
on it). Sources: the AWS-recorded range tests of moto (getmoto/moto#6778) and LocalStack
(``test_get_object_range``, localstack/localstack#9076), Trino's note that AWS accepts a
suffix range on an empty object (adobe/S3Mock#2789), and versitygw's ``ParseObjectRange``.

Where no source records what S3 does, this follows the grammar of RFC 9110 §14.1: the
unit ``bytes`` matches case-insensitively, another unit is ignored (§14.2), and so is a
range with whitespace or a sign inside it, digits other than ASCII 0-9, or a number past
2**63 - 1 (versitygw ignores those too). Leading zeros are digits and are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from s3cache.errors import InvalidRange

#: The message S3 puts in its InvalidRange error document.
NOT_SATISFIABLE = "The requested range is not satisfiable"

#: Positions past a signed 64-bit integer make the header invalid (as in versitygw).
_MAX_OFFSET = 2**63 - 1

# RFC 9110 §14.1.2: int-range = first-pos "-" [ last-pos ]; suffix-range = "-" suffix-length.
# Exactly one range, ASCII digits only, nothing around them.
_SINGLE_RANGE = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A satisfiable byte range of an object: ``start`` and ``end`` both inclusive."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The Content-Range of the 206 answer (RFC 9110 §14.4): ``bytes 0-9/10``."""
        return f"bytes {self.start}-{self.end}/{size}"


def unsatisfied_content_range(size: int) -> str:
    """The Content-Range that goes with a 416 answer (RFC 9110 §14.4): ``bytes */10``."""
    return f"bytes */{size}"


@dataclass(frozen=True, slots=True)
class RangeHeader:
    """A request's Range header, parsed once, before the object's size is known; it is
    resolved against the size (:meth:`resolve`) when the object's metadata is at hand."""

    #: ``(first, last)`` of an int-range (last may be absent), the suffix-length of a
    #: suffix-range, or None if S3 ignores the header.
    spec: tuple[int, int | None] | int | None
    #: Several ranges asked (``bytes=0-1,5-6``): S3 ignores the header; a cache cannot
    #: answer it as S3 would (``is_multi_range``).
    multi: bool = False

    @classmethod
    def parse(cls, header: str | None) -> RangeHeader:
        if header is None:
            return _NO_RANGE
        unit, equals, range_set = header.strip().partition("=")
        # RFC 9110 §14.1: range units are case-insensitive; an unknown unit is ignored
        # (§14.2).
        if not equals or unit.lower() != "bytes":
            return _NO_RANGE
        if "," in range_set:
            return _MULTI_RANGE
        return cls(_range_spec(range_set))

    @property
    def suffix(self) -> bool:
        """A suffix range (``bytes=-n``): where it starts depends on the size."""
        return isinstance(self.spec, int)

    @property
    def first_byte(self) -> int:
        """The first byte asked for, as far as the header alone tells (0 if it cannot)."""
        return self.spec[0] if isinstance(self.spec, tuple) else 0

    def resolve(self, size: int) -> ByteRange | None:
        """:func:`parse_range` of the header against an object of ``size`` bytes."""
        if size < 0:
            raise ValueError(f"object size cannot be negative: {size}")
        spec = self.spec
        if spec is None:
            return None
        if isinstance(spec, int):
            return _suffix_range(spec, size)
        first, last = spec
        return _int_range(first, last, size)


_NO_RANGE = RangeHeader(None)
_MULTI_RANGE = RangeHeader(None, multi=True)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Resolve a Range header against an object of ``size`` bytes.

    Returns None when the whole object is to be served with 200: no header, or one S3
    ignores. Raises :class:`InvalidRange` (416) when S3 refuses the range; the answer then
    carries ``Content-Range: bytes */size`` (:func:`unsatisfied_content_range`).

    The same rules apply to HeadObject, which takes a Range too. Preconditions are
    evaluated first (RFC 9110 §13.2.2 step 5): a 412 or 304 wins over a 416.
    """
    return RangeHeader.parse(header).resolve(size)


def is_multi_range(header: str | None) -> bool:
    """Whether the header asks for several byte ranges (``bytes=0-1,5-6``).

    S3 ignores such a header and serves the whole object with 200, which is also what
    :func:`parse_range` returns for it; this only tells the two cases apart.
    """
    return RangeHeader.parse(header).multi


def _range_spec(range_set: str) -> tuple[int, int | None] | int | None:
    """``(first, last)`` of a single int-range (last may be absent), the suffix-length
    of a suffix-range, or None if S3 ignores it."""
    match = _SINGLE_RANGE.fullmatch(range_set)
    if match is None:
        return None
    first_text, last_text = match.groups()
    first, last = _offset(first_text), _offset(last_text)
    if (first_text and first is None) or (last_text and last is None):
        return None  # a number past 64 bits
    if first is None:
        return last  # "bytes=-n", or None for "bytes=-"
    # RFC 9110 §14.1.1: an int-range whose last-pos is less than its first-pos is invalid,
    # and S3 ignores the header (even when first-pos is past the end of the object).
    if last is not None and last < first:
        return None
    return first, last


def _offset(digits: str) -> int | None:
    """The value of a run of ASCII digits, or None if empty or past 64 bits. The length is
    checked first: ``int()`` refuses strings of more than 4,300 digits."""
    significant = digits.lstrip("0")
    if not digits or len(significant) > len(str(_MAX_OFFSET)):
        return None
    value = int(significant or "0")
    return value if value <= _MAX_OFFSET else None


def _int_range(first: int, last: int | None, size: int) -> ByteRange:
    # RFC 9110 §14.1.2: satisfiable only if first-pos is less than the length; a last-pos
    # at or past the end means "to the end".
    if first >= size:
        raise InvalidRange(NOT_SATISFIABLE)
    end = size - 1 if last is None else min(last, size - 1)
    return ByteRange(first, end)


def _suffix_range(suffix_length: int, size: int) -> ByteRange | None:
    # RFC 9110 §14.1.2: a suffix-range needs a non-zero suffix-length to be satisfiable.
    if suffix_length == 0:
        raise InvalidRange(NOT_SATISFIABLE)
    if size == 0:
        return None  # S3 serves the empty object with 200 instead of a 416.
    return ByteRange(max(size - suffix_length, 0), size - 1)

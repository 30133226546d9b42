"""Conditional GetObject and HeadObject requests, answered from cached metadata as S3 does.

Amazon S3 evaluates If-Match, If-Unmodified-Since, If-None-Match and If-Modified-Since in
the order of RFC 9110 §13.2.2, the same way for GET and HEAD:

1. If-Match present: false -> 412. If-Unmodified-Since is then ignored (§13.1.4).
2. Otherwise If-Unmodified-Since: modified after the date -> 412.
3. If-None-Match present: an ETag matches -> 304. If-Modified-Since is then ignored
   (§13.1.3).
4. Otherwise If-Modified-Since: not modified after the date -> 304.

So a 412 wins over a 304, and If-Match true with If-Modified-Since false is a 304. The
two "both headers present" paragraphs of the GetObject and HeadObject references say the
same (https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html), and so does,
case by case, versitygw's integration test ``GetObject_conditional_reads``, which covers
every combination of the four headers and which its authors report as matching AWS
(versity/versitygw#1508).

Entity tags: S3 compares the value with or without its double quotes (``abc`` and
``"abc"`` match ``"abc"``; versitygw#1715, moto's AWS-verified conditional-write tests).
``*`` matches any object: ``If-Match: *`` proceeds, ``If-None-Match: *`` is a 304
(ceph/s3-tests#681, versitygw#2194). A list matches if any member does (RFC 9110 §13.1.1,
§13.1.2). If-Match compares strongly, so a weak ``W/"…"`` member never matches; If-None-Match
compares weakly, so ``W/"abc"`` matches ``"abc"`` (RFC 9110 §8.8.3.2; S3 never sends a weak
ETag, and what it does with one is not recorded anywhere found).

Dates: a value that is not an HTTP-date is ignored (RFC 9110 §13.1.3, §13.1.4); S3 does
not take ISO 8601 either (brendanhay/amazonka#879). An If-Modified-Since later than now is
ignored, as RFC 2616 §14.25 put it ("a date which is later than the server's current time
is invalid") and as S3 does (versitygw#1522; apache/opendal#5500); "now" is never taken to
be before Last-Modified, since S3's clock had reached it. Last-Modified has one-second
precision, so the object's time is truncated to the second before comparing.

What S3 sends with the outcome, for the caller:

- 304 Not Modified (GET and HEAD): no body; the ETag and Last-Modified the 200 would have
  carried (getmoto/moto#8534, jamhall/s3rver#61), the usual x-amz-request-id, x-amz-id-2,
  Date and Server, and no Content-* headers (moto's responses.py: "Real S3 omits any
  content-* headers for a 304"; RFC 9110 §15.4.5).
- 412 Precondition Failed: the error document with Code ``PreconditionFailed`` and
  :data:`PRECONDITION_FAILED_MESSAGE` (moto's AWS-verified tests; S3 adds a ``<Condition>``
  element naming the header, e.g. ``If-Match``); for HEAD, no body at all.
- Preconditions are evaluated before the Range (RFC 9110 §13.2.2 step 5).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

#: The message of S3's PreconditionFailed error document.
PRECONDITION_FAILED_MESSAGE = "At least one of the pre-conditions you specified did not hold"

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_DAY = "|".join(_DAYS)
_MONTH = "|".join(_MONTHS)
_TIME = r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"

# The three forms of HTTP-date a recipient must accept (RFC 9110 §5.6.7), case-sensitive.
_IMF_FIXDATE = re.compile(
    rf"(?:{_DAY}), (?P<day>[0-9]{{2}}) (?P<month>{_MONTH}) (?P<year>[0-9]{{4}}) {_TIME} GMT"
)
_RFC850_DATE = re.compile(
    rf"(?:{'|'.join(_LONG_DAYS)}), (?P<day>[0-9]{{2}})-(?P<month>{_MONTH})-(?P<year>[0-9]{{2}})"
    rf" {_TIME} GMT"
)
_ASCTIME_DATE = re.compile(
    rf"(?:{_DAY}) (?P<month>{_MONTH}) (?P<day>[0-9]{{2}}| [0-9]) {_TIME} (?P<year>[0-9]{{4}})"
)

# One member of an If-Match / If-None-Match list: an optionally weak entity-tag, quoted
# (a comma inside the quotes belongs to the tag) or, as S3 also accepts, unquoted.
_LIST_MEMBER = re.compile(r'\s*(?P<weak>W/)?(?P<tag>"[^"]*"|[^,]*?)\s*(?:,|\Z)')


class Precondition(enum.Enum):
    """What the conditional headers of a GET or HEAD decide."""

    PROCEED = "proceed"  # serve the object (200, or 206 with a Range)
    NOT_MODIFIED = "not-modified"  # 304
    FAILED = "failed"  # 412 PreconditionFailed


_CONDITIONAL_HEADERS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


def evaluate(
    headers: Mapping[str, str],
    etag: str,
    last_modified: datetime,
    *,
    now: datetime | None = None,
) -> Precondition:
    """Evaluate the precondition headers of a GetObject or HeadObject request.

    ``headers`` is looked up case-insensitively (aiohttp's CIMultiDictProxy; repeated
    fields are joined into one list). ``etag`` is the object's ETag as S3 sends it,
    ``last_modified`` its timezone-aware Last-Modified, ``now`` the current time (for
    telling a future If-Modified-Since; defaults to the clock).
    """
    if last_modified.tzinfo is None:
        raise ValueError("last_modified must be timezone-aware")
    if not any(name in headers for name in _CONDITIONAL_HEADERS):
        return Precondition.PROCEED  # the common read: no conditions to evaluate
    modified = _to_second(last_modified)
    if_match = _field(headers, "If-Match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, weak=False):
            return Precondition.FAILED
    else:
        unmodified_since = _date_field(headers, "If-Unmodified-Since")
        if unmodified_since is not None and modified > unmodified_since:
            return Precondition.FAILED
    if_none_match = _field(headers, "If-None-Match")
    if if_none_match is not None:
        if _etag_matches(if_none_match, etag, weak=True):
            return Precondition.NOT_MODIFIED
    else:
        modified_since = _date_field(headers, "If-Modified-Since")
        # S3's clock had reached Last-Modified when it stored the object; ours may lag.
        current = max(datetime.now(UTC) if now is None else now, modified)
        if modified_since is not None and modified <= modified_since <= current:
            return Precondition.NOT_MODIFIED
    return Precondition.PROCEED


def parse_http_date(text: str, *, now: datetime | None = None) -> datetime | None:
    """Parse an HTTP-date in any of its three forms (RFC 9110 §5.6.7) into an aware UTC
    datetime, or None if it is not one: IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``,
    the obsolete RFC 850 ``Sunday, 06-Nov-94 08:49:37 GMT`` and asctime
    ``Sun Nov  6 08:49:37 1994``. The weekday is checked for form, not against the date.

    An RFC 850 two-digit year more than 50 years after ``now`` is read as the most recent
    past year with those digits (RFC 9110 §5.6.7).
    """
    text = text.strip()
    match = _IMF_FIXDATE.fullmatch(text) or _ASCTIME_DATE.fullmatch(text)
    if match is not None:
        year = int(match["year"])
    elif (match := _RFC850_DATE.fullmatch(text)) is not None:
        year = _two_digit_year(int(match["year"]), datetime.now(UTC) if now is None else now)
    else:
        return None
    try:
        return datetime(
            year,
            _MONTHS.index(match["month"]) + 1,
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            tzinfo=UTC,
        )
    except ValueError:  # Feb 30, hour 24, a leap second...
        return None


def format_http_date(dt: datetime) -> str:
    """Format an aware datetime as an IMF-fixdate (RFC 9110 §5.6.7), the form S3 uses in
    Last-Modified: ``Sun, 06 Nov 1994 08:49:37 GMT``. Sub-second digits are dropped."""
    if dt.tzinfo is None:
        raise ValueError("an HTTP-date needs a timezone-aware datetime")
    dt = dt.astimezone(UTC)
    return (
        f"{_DAYS[dt.weekday()]}, {dt.day:02d} {_MONTHS[dt.month - 1]} {dt.year:04d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} GMT"
    )


def _field(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its repeated field lines joined into one list (RFC 9110 §5.3);
    None when absent or empty."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = list(getall(name, ()))
    else:
        value = headers.get(name)
        values = [] if value is None else [value]
    joined = ", ".join(stripped for value in values if (stripped := value.strip()))
    return joined or None


def _date_field(headers: Mapping[str, str], name: str) -> datetime | None:
    # RFC 9110 §13.1.3, §13.1.4: a value that is not one valid HTTP-date (a list of dates
    # included) is ignored.
    value = _field(headers, name)
    return None if value is None else parse_http_date(value)


def _etag_matches(field: str, etag: str, *, weak: bool) -> bool:
    current = _opaque(etag)
    for is_weak, tag in _list_members(field):
        if tag == "*":
            return True
        if (weak or not is_weak) and _opaque(tag) == current:
            return True
    return False


def _list_members(field: str) -> Iterator[tuple[bool, str]]:
    """``(weak, tag)`` for each non-empty member of an entity-tag list."""
    position = 0
    while position < len(field):
        match = _LIST_MEMBER.match(field, position)
        if match is None or match.end() == position:
            return
        position = match.end()
        if match["tag"]:
            yield match["weak"] is not None, match["tag"]


def _opaque(tag: str) -> str:
    """The entity-tag without its quotes, which S3 does not require."""
    return tag.strip('"')


def _to_second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _two_digit_year(two_digits: int, now: datetime) -> int:
    year = now.year - now.year % 100 + two_digits
    return year - 100 if year > now.year + 50 else year

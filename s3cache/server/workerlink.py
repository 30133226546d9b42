"""What a secondary worker and the primary say to each other (see ``supervisor``).

Requests a secondary passes on carry ``X-S3cache-Worker``: ``INDEX:`` and a
``signing.Signer`` claim (a time stamp and an HMAC under the run's secret) of the
worker's index, the method, the request target and the client's address, which travels
in ``X-S3cache-Client`` so that the primary judges admin
requests by the real client, not by the Unix socket they came over.

The channel is a WebSocket from each secondary to the primary, JSON messages:

    primary -> secondary  {"ownership": {...}}  who owns which key (``cluster.Ownership``):
                                             first, then whenever it changes
                          {"ready": {...}}   an object the secondary may serve itself
                          {"gone": [ids]}    entries it must stop serving
                          {"sync": n}        answer {"ack": n} once all before is done
    secondary -> primary  {"ack": n}
                          {"reads": [[bucket, key, id, start, end], ...]}  served reads
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from s3cache.errors import AccessDenied
from s3cache.signing import CLIENT_HEADER, WORKER_HEADER, Signer
from s3cache.store.entry import Entry, ObjectMeta
from s3cache.store.files import Stamp

CHANNEL_PATH = "/_s3cache/worker/channel"

# Set on requests that came from a secondary: its index, and the client's address.
VIA_WORKER = web.RequestKey("via_worker", int)
CLIENT_ADDRESS = web.RequestKey("client_address", str)


class WorkerSigner:
    """A secondary's claim: ``INDEX:`` and a ``signing.Signer`` claim (the run's secret)
    of the index, method, request target and client address."""

    def __init__(self, secret: str) -> None:
        self._signer = Signer(secret, "worker")

    def sign(self, index: int, method: str, target: str, client: str) -> str:
        return f"{index}:{self._signer.sign(str(index), method, target, client)}"

    def verify(self, request: web.Request) -> bool:
        """True if a secondary sent this request (its index and the client's address
        are then set on it); False if it does not claim to; AccessDenied if the claim
        is false."""
        claim = request.headers.get(WORKER_HEADER)
        if claim is None:
            return False
        index, _, rest = claim.partition(":")
        if not index.isdigit():
            raise AccessDenied("Bad worker signature.")
        client = request.headers.get(CLIENT_HEADER, "")
        self._signer.verify(rest, index, request.method, request.raw_path, client)
        request[VIA_WORKER] = int(index)
        request[CLIENT_ADDRESS] = client
        return True


@dataclass(frozen=True, slots=True)
class Ready:
    """An object version a secondary may serve from the primary's file."""

    id: int
    bucket: str
    key: str
    path: str
    validated_at: float
    meta: ObjectMeta
    # The file as the primary checked every block of it: a secondary serves it only
    # while its open file is still that (a file changed since is the primary's to check).
    stamp: Stamp | None

    @classmethod
    def of(cls, entry: Entry) -> Ready:
        return cls(
            entry.id, entry.bucket, entry.key, str(entry.path), entry.validated_at, entry.meta,
            entry.stamp,
        )

    def to_json(self) -> dict[str, Any]:
        m = self.meta
        return {
            "id": self.id,
            "bucket": self.bucket,
            "key": self.key,
            "path": self.path,
            "validated_at": self.validated_at,
            "etag": m.etag,
            "size": m.size,
            "last_modified": m.last_modified,
            "headers": [list(pair) for pair in m.headers],
            "stamp": None if self.stamp is None else list(self.stamp),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ready:
        meta = ObjectMeta(
            etag=data["etag"],
            size=int(data["size"]),
            last_modified=data["last_modified"],
            headers=tuple((str(name), str(value)) for name, value in data["headers"]),
        )
        return cls(
            int(data["id"]),
            data["bucket"],
            data["key"],
            data["path"],
            float(data["validated_at"]),
            meta,
            None if data.get("stamp") is None else Stamp(*(int(v) for v in data["stamp"])),
        )


def servable(entry: Entry) -> bool:
    """Every block present and checked by the primary: a secondary may serve it."""
    return (
        not entry.dropped
        and len(entry.blocks) == entry.block_count
        and all(block in entry.verified for block in entry.blocks)
    )


def unix_path(url: str) -> str:
    """The socket path of a ``unix:/path`` URL."""
    if not url.startswith("unix:"):
        raise ValueError(f"not a unix: URL: {url}")
    return url[len("unix:") :]

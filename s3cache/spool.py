"""A client's upload body written to a cache file as it arrives, hashed on the way.

One ``Spool`` per body: a PutObject's whole object, or one part of a multipart upload
written where it lands in the object (``offset``; several parts share the file). On
the way it computes what the write modes need: the MD5 (the ETag of a PUT or a part),
the client's checksums (checked before anything is promised: ``check_digests``), and
the xxh3-64 of every block (as a fill records blocks; only for a body that starts on
a block boundary).

Each piece is written with aiofiles (one executor hop, as every file write here is off
the loop) while the MD5 and checksums of the same piece run in a second worker thread
(hashlib releases the GIL: MD5 is ~700 MB/s on a core); the hashes of a piece are
awaited when the next piece comes, so that reading the body, writing it and hashing
it overlap, and uploads arriving together use several cores. A write that fails
(disk full) stops the spooling, not the upload (``failed``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Protocol

import aiofiles
import aiofiles.os
import xxhash
from aiohttp import web
from multidict import CIMultiDictProxy

from s3cache.errors import BadDigest

log = logging.getLogger(__name__)


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


# The client's checksums a spool checks itself before anything is promised (the
# upstream checks them again at the upload); a write-back with another one cannot be
# promised.
CHECKSUMS: dict[str, Callable[[], _Digest]] = {
    "x-amz-checksum-crc32": lambda: _Crc32(),
    "x-amz-checksum-sha1": lambda: hashlib.sha1(),
    "x-amz-checksum-sha256": lambda: hashlib.sha256(),
}


def checksum_headers(headers: CIMultiDictProxy[str]) -> list[str]:
    """The checksum headers (lower case) of a request that a spool can check."""
    return [name.lower() for name in headers if name.lower() in CHECKSUMS]


class Spool:
    def __init__(
        self,
        path: Path,
        block_size: int,
        *,
        offset: int = 0,
        shared: bool = False,
        checks: Iterable[str] = (),
        place: tuple[int, str] | None = None,
        limit: int | None = None,
    ) -> None:
        """``path``: the file; ``offset``: where the body goes in it; ``shared``: other
        bodies write the same file (it is opened, never truncated); ``checks``: the
        client's checksum headers to check; ``place``: the file's (cache dir, name) as
        ``CacheStore.new_file`` gave it, for the entry it will become; ``limit``: the
        most bytes it may write (a part in a shared file never reaches the next one's
        place: more is a failed spool)."""
        self.path = path
        self.offset = offset
        self.place = place
        self._shared = shared
        self._limit = limit
        self._block_size = block_size
        # Blocks are hashed only when the body starts on a block boundary.
        self._first_block = offset // block_size if offset % block_size == 0 else None
        self.blocks: dict[int, int] = {}
        self.size = 0
        self.failed = False
        self._md5 = hashlib.md5()
        self._block = xxhash.xxh3_64()
        self.checks: dict[str, _Digest] = {name: CHECKSUMS[name]() for name in checks}
        self._file: aiofiles.threadpool.binary.AsyncBufferedIOBase | None = None
        self._hashing: asyncio.Future[None] | None = None

    async def open(self) -> None:
        await aiofiles.os.makedirs(self.path.parent, exist_ok=True)
        if self._shared:
            self._file = await aiofiles.open(self.path, "r+b", opener=_create)
            await self._file.seek(self.offset)
        else:
            self._file = await aiofiles.open(self.path, "wb")

    async def write(self, data: bytes) -> None:
        await self._hashed()
        if self.failed or self._file is None:
            return
        if self._limit is not None and self.size + len(data) > self._limit:
            log.warning("spool %s: more than its %d bytes (not cached)", self.path, self._limit)
            self.failed = True
            return
        self._hashing = asyncio.get_running_loop().run_in_executor(None, self._hash, data)
        try:
            await self._file.write(data)
        except OSError as exc:
            log.warning("write spool %s failed: %s (not cached)", self.path, exc)
            self.failed = True
            return
        if self._first_block is None:
            self.size += len(data)
            return
        view = memoryview(data)
        while view:
            room = self._block_size - self.size % self._block_size
            piece = view[:room]
            self._block.update(piece)
            self.size += len(piece)
            view = view[len(piece) :]
            if self.size % self._block_size == 0:
                self._end_block()

    def _hash(self, data: bytes) -> None:
        self._md5.update(data)
        for check in self.checks.values():
            check.update(data)

    async def _hashed(self) -> None:
        hashing, self._hashing = self._hashing, None
        if hashing is not None:
            await hashing

    def _end_block(self) -> None:
        assert self._first_block is not None
        self.blocks[self._first_block + (self.size - 1) // self._block_size] = (
            self._block.intdigest()
        )
        self._block.reset()

    @property
    def etag(self) -> str:
        return f'"{self.md5_hex}"'

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()

    @property
    def md5_base64(self) -> str:
        return base64.b64encode(self._md5.digest()).decode()

    async def finish(self, *, durable: bool) -> bool:
        """Close the file (its bytes and its directory entry fsync'd if ``durable``);
        False if it is not a complete copy."""
        await self._hashed()
        if self._file is None:
            return False
        if self._first_block is not None and self.size % self._block_size:
            self._end_block()
        file, self._file = self._file, None
        loop = asyncio.get_running_loop()
        try:
            await file.flush()
            if durable:
                await loop.run_in_executor(None, fsync, file.fileno())
            await file.close()
            if durable:
                await loop.run_in_executor(None, fsync_dir, self.path)
        except OSError as exc:
            log.warning("write spool %s failed: %s (not cached)", self.path, exc)
            self.failed = True
        return not self.failed

    def check_digests(self, request: web.Request) -> None:
        """The body against the client's Content-MD5 and checksum headers (BadDigest)."""
        md5 = request.headers.get("Content-MD5")
        if md5 is not None and md5 != self.md5_base64:
            raise BadDigest("The Content-MD5 you specified did not match what we received.")
        for name, digest in self.checks.items():
            if request.headers.get(name) != base64.b64encode(digest.digest()).decode():
                algorithm = name.removeprefix("x-amz-checksum-").upper()
                raise BadDigest(
                    f"The {algorithm} you specified did not match the calculated checksum."
                )

    async def close(self) -> None:
        """Stop writing (the file stays: a shared file is other bodies' too)."""
        with contextlib.suppress(BaseException):
            await self._hashed()
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                await file.close()

    async def discard(self) -> None:
        """Stop writing and remove the file."""
        await self.close()
        with contextlib.suppress(OSError):
            await aiofiles.os.remove(self.path)

    async def tee(self, body: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
        """The body as it goes to the upstream, spooled on the way."""
        if body is None:
            return
        async for piece in body:
            await self.write(piece)
            yield piece


def _create(path: str, flags: int) -> int:
    """Open for a shared spool: created if missing, never truncated."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """The directory entry of ``path`` made durable."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

"""Multipart uploads cached on the way (README, "Write modes"): write-through and
write-back of CreateMultipartUpload / UploadPart / CompleteMultipartUpload.

Each part's body is spooled to its own file (aiofiles) under ``spool/`` of the key's
cache dir, with its MD5 (a part's ETag). On completion the parts named by the client
are joined into a new cache file, block hashes computed on the way, and that file
becomes the key's entry (``store.adopt``):

- ``through``: every request goes to the upstream as it came; the upload is tracked
  by the upstream's UploadId; once CompleteMultipartUpload succeeded (a 200 whose body
  is not an ``<Error>``: https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html),
  a HEAD gives the entry's metadata.
- ``back``: the upload lives here until it is completed: s3cache makes the UploadId
  (``s3cache-…``) and answers each part once spooled. CompleteMultipartUpload joins and
  fsyncs the object, commits its entry and journal row (with the part sizes and MD5s),
  and answers the ETag S3 will give: the MD5 of the parts' MD5s, ``-N``. The uploader
  sends it as a multipart upload with the same part boundaries, so that ETag is what the
  upstream computes. Parts are not fsync'd: until completion nothing is acknowledged as
  an object, and an upload that a crash interrupts is gone (its UploadId unknown).

Over ``writeback_max`` at completion, a write-back upload is uploaded to the upstream
there and then (its client waits, as for write-through); it never fails for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import aiofiles
import aiofiles.os
import xxhash
from aiohttp import web
from multidict import CIMultiDict

from s3cache.errors import (
    EntityTooSmall,
    InvalidArgument,
    InvalidPart,
    InvalidPartOrder,
    InvalidRequest,
    MalformedXML,
)
from s3cache.forward import relay_response, response_headers, send_upstream, upstream_request
from s3cache.metrics import UpstreamKind
from s3cache.s3.addressing import S3Address
from s3cache.store import files
from s3cache.store.cache import CacheStore, CacheWriteError
from s3cache.store.entry import ObjectMeta
from s3cache.upstream import Upstream
from s3cache.writes import BACK, Changed, Joiner, Writer, promised_meta, replayed, xml_text

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
MIN_PART = 5 * 1024**2  # every part but the last (S3 multipart upload limits)
MAX_COMPLETE_BODY = 4 * 1024**2  # 10,000 parts of XML
_JOIN_PIECE = 8 * 1024**2
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
# A write-back upload is sent on with Content-MD5 per part, not the checksums the
# client's SDK asked for at creation (those would need every part's checksum sent
# with it, and in the completion).
_PART_CHECKSUMS = frozenset({"x-amz-checksum-algorithm", "x-amz-checksum-type"})


@dataclass(slots=True)
class _Part:
    path: Path
    size: int
    md5: str  # hex


@dataclass(slots=True)
class _Upload:
    id: str
    bucket: str
    key: str
    mode: str
    headers: tuple[tuple[str, str], ...]  # CreateMultipartUpload's, as forwarded
    content_type: str | None
    stored: tuple[tuple[str, str], ...]  # what a GET will answer with (metadata…)
    dir: Path
    parts: dict[int, _Part] = field(default_factory=dict)


class Multipart:
    def __init__(
        self, store: CacheStore, upstream: Upstream, writer: Writer, cache_dirs: tuple[Path, ...]
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._writer = writer
        self._dirs = cache_dirs
        self._uploads: dict[str, _Upload] = {}

    async def start(self) -> None:
        """Parts of uploads that a stop interrupted are of no use: removed."""
        loop = asyncio.get_running_loop()
        for directory in self._dirs:
            await loop.run_in_executor(None, shutil.rmtree, directory / SPOOL_DIR, True)

    def handles(self, request: web.Request, address: S3Address) -> bool:
        """A request of an upload this module takes part in (or starts one)."""
        if address.has_param("uploads"):
            return request.method == "POST"
        upload_id = address.param("uploadId")
        return upload_id is not None and upload_id in self._uploads

    async def handle(
        self, request: web.Request, address: S3Address, mode: str, changed: Changed
    ) -> web.StreamResponse:
        if address.has_param("uploads"):
            return await self._create(request, address, mode)
        upload = self._uploads[address.param("uploadId") or ""]
        if request.method == "PUT" and address.param("partNumber") is not None:
            if "x-amz-copy-source" in request.headers and upload.mode == BACK:
                raise InvalidRequest("UploadPartCopy is not supported in write-back mode.")
            return await self._part(request, address, upload)
        if request.method == "POST":
            return await self._complete(request, address, upload, changed)
        if request.method == "DELETE":
            await self._forget(upload)
            if upload.mode == BACK:
                return web.Response(status=204)
            return await _forward(request, address, self._upstream)
        if upload.mode == BACK:
            raise InvalidRequest("ListParts is not supported for a write-back upload.")
        return await _forward(request, address, self._upstream)

    # --- create ------------------------------------------------------------------

    async def _create(
        self, request: web.Request, address: S3Address, mode: str
    ) -> web.StreamResponse:
        assert address.bucket is not None and address.key is not None
        headers, _ = upstream_request(request)
        if mode == BACK:
            await self._writer.check_bucket(address.bucket)  # as S3 does: NoSuchBucket here
            upload_id = f"s3cache-{secrets.token_hex(16)}"
            self._new_upload(upload_id, address, mode, headers, request)
            return _xml(
                "InitiateMultipartUploadResult",
                [("Bucket", address.bucket), ("Key", address.key), ("UploadId", upload_id)],
            )
        response = await send_upstream(request, address, self._upstream)
        async with response:
            body = await response.read()
            if response.status == 200:
                created = xml_text(body, "UploadId")
                if created:
                    self._new_upload(created, address, mode, headers, request)
            return web.Response(
                status=response.status, headers=response_headers(response), body=body
            )

    def _new_upload(
        self,
        upload_id: str,
        address: S3Address,
        mode: str,
        headers: CIMultiDict[str],
        request: web.Request,
    ) -> None:
        assert address.bucket is not None and address.key is not None
        directory = files.choose_dir(address.bucket, address.key, len(self._dirs))
        meta = promised_meta(request, "", 0, time.time(), ())
        self._uploads[upload_id] = _Upload(
            id=upload_id,
            bucket=address.bucket,
            key=address.key,
            mode=mode,
            headers=tuple(
                (name, value)
                for name, value in replayed(headers)
                if mode != BACK or name.lower() not in _PART_CHECKSUMS
            ),
            content_type=request.headers.get("Content-Type"),
            stored=meta.headers,
            dir=self._dirs[directory] / SPOOL_DIR / upload_id.replace("/", "_")[:96],
        )

    # --- parts -------------------------------------------------------------------

    async def _part(
        self, request: web.Request, address: S3Address, upload: _Upload
    ) -> web.StreamResponse:
        number_text = address.param("partNumber") or ""
        if not number_text.isdigit() or not 1 <= int(number_text) <= 10000:
            raise InvalidArgument("Part number must be an integer between 1 and 10000.")
        number = int(number_text)
        headers, body = upstream_request(request)
        await aiofiles.os.makedirs(upload.dir, exist_ok=True)
        path = upload.dir / f"{number:05d}.{secrets.token_hex(4)}"
        md5 = hashlib.md5()
        size = 0
        file = await aiofiles.open(path, "wb")
        spooled = True
        answer: web.StreamResponse

        async def tee() -> AsyncIterator[bytes]:
            nonlocal size, spooled
            assert body is not None
            loop = asyncio.get_running_loop()
            async for piece in body:
                # MD5 (400 MB/s on a core, the GIL released) in a worker thread beside
                # the write: parts arriving together hash on several cores.
                digest = loop.run_in_executor(None, md5.update, piece)
                if spooled:
                    try:
                        await file.write(piece)
                    except OSError as exc:
                        log.warning("spooling part %d of %s failed: %s", number, upload.id, exc)
                        spooled = False
                await digest
                size += len(piece)
                yield piece

        try:
            if upload.mode == BACK:
                if body is not None:
                    async for _ in tee():
                        pass
                await file.close()
                if not spooled:
                    raise CacheWriteError("cannot spool the part")
                answer = web.Response(status=200, headers={"ETag": f'"{md5.hexdigest()}"'})
            else:
                stream = tee() if body is not None else None
                url = self._upstream.url(address.bucket, address.key, address.query)
                response = await self._upstream.request(
                    "PUT", url, headers, stream, kind=_FORWARD
                )
                async with response:
                    await file.close()
                    if response.status >= 300 or not spooled:
                        spooled = False
                    answer = await relay_response(request, response)
        except BaseException:
            with contextlib.suppress(OSError):
                await file.close()
            await _remove(path)
            raise
        old = upload.parts.pop(number, None)
        if old is not None:
            await _remove(old.path)
        if spooled:
            upload.parts[number] = _Part(path, size, md5.hexdigest())
        else:
            await _remove(path)
        return answer

    # --- complete ----------------------------------------------------------------

    async def _complete(
        self, request: web.Request, address: S3Address, upload: _Upload, changed: Changed
    ) -> web.StreamResponse:
        body = await request.content.read(MAX_COMPLETE_BODY + 1)
        if len(body) > MAX_COMPLETE_BODY:
            raise MalformedXML("The CompleteMultipartUpload body is too large.")
        listed = _listed_parts(body)
        await self._writer.settle(upload.bucket, upload.key)
        if upload.mode != BACK:
            return await self._complete_through(request, address, upload, body, listed, changed)
        parts = self._chosen(upload, listed)
        etag = _multipart_etag([part.md5 for part in parts])
        size = sum(part.size for part in parts)
        meta = ObjectMeta(
            etag=etag,
            size=size,
            last_modified=promised_meta(request, etag, size, time.time(), ()).last_modified,
            headers=upload.stored,
        )
        sizes = tuple((part.size, part.md5) for part in parts)
        if not self._writer.room_for(size):
            sources = [(part.path, 0, part.size, part.md5) for part in parts]
            await self._writer.upload_now(upload.bucket, upload.key, upload.headers, sources)
            await changed()
            await self._forget(upload)
            return _complete_answer(upload, etag)
        await self._writer.keep_back(
            upload.bucket, upload.key, meta, upload.headers, sizes, self._join(upload, parts),
            changed,
        )
        await self._forget(upload)
        return _complete_answer(upload, etag)

    def _chosen(self, upload: _Upload, listed: list[tuple[int, str]]) -> list[_Part]:
        """The parts the client names, checked as S3 checks them."""
        if not listed:
            raise MalformedXML("The CompleteMultipartUpload body names no part.")
        numbers = [number for number, _ in listed]
        if numbers != sorted(set(numbers)):
            raise InvalidPartOrder("The list of parts was not in ascending order.")
        parts = []
        for number, etag in listed:
            part = upload.parts.get(number)
            if part is None or etag.strip('"') != part.md5:
                raise InvalidPart(
                    "One or more of the specified parts could not be found or its ETag did "
                    "not match."
                )
            parts.append(part)
        if any(part.size < MIN_PART for part in parts[:-1]):
            raise EntityTooSmall("Your proposed upload is smaller than the minimum allowed size")
        return parts

    def _join(self, upload: _Upload, parts: list[_Part]) -> Joiner:
        async def join(path: Path, block_size: int) -> dict[int, int]:
            sources = [(part.path, part.size) for part in parts]
            return await asyncio.get_running_loop().run_in_executor(
                None, _join_files, sources, path, block_size
            )

        return join

    async def _complete_through(
        self,
        request: web.Request,
        address: S3Address,
        upload: _Upload,
        body: bytes,
        listed: list[tuple[int, str]],
        changed: Changed,
    ) -> web.StreamResponse:
        response = await send_upstream(request, address, self._upstream, body=body)
        async with response:
            answer = await response.read()
            headers = response_headers(response)
            status = response.status
        if status == 200 and b"<Error>" not in answer:
            await changed()
            etag = xml_text(answer, "ETag")
            with contextlib.suppress(InvalidPart, InvalidPartOrder, EntityTooSmall):
                parts = [upload.parts[number] for number, _ in listed if number in upload.parts]
                if len(parts) == len(listed) and etag:
                    size = sum(part.size for part in parts)
                    await self._writer.keep_through(
                        upload.bucket, upload.key, etag, size, self._join(upload, parts)
                    )
            await self._forget(upload)
        return web.Response(status=status, headers=headers, body=answer)

    async def _forget(self, upload: _Upload) -> None:
        self._uploads.pop(upload.id, None)
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, upload.dir, True)


_FORWARD = UpstreamKind.FORWARD


async def _forward(
    request: web.Request, address: S3Address, upstream: Upstream
) -> web.StreamResponse:
    response = await send_upstream(request, address, upstream)
    async with response:
        return await relay_response(request, response)


async def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        await aiofiles.os.remove(path)


def _join_files(sources: list[tuple[Path, int]], target: Path, block_size: int) -> dict[int, int]:
    """Write the parts one after the other into ``target``, fsync'd; the xxh3-64 of
    every block. (One pass in a worker thread: read, hash, write.)"""
    blocks: dict[int, int] = {}
    hasher = xxhash.xxh3_64()
    position = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for path, size in sources:
            with open(path, "rb", buffering=0) as source:
                left = size
                while left:
                    piece = source.read(min(_JOIN_PIECE, left))
                    if not piece:
                        raise OSError(f"part file {path} ended early")
                    left -= len(piece)
                    view = memoryview(piece)
                    while view:
                        room = block_size - position % block_size
                        chunk = view[:room]
                        hasher.update(chunk)
                        written = os.write(out, chunk)
                        while written < len(chunk):
                            written += os.write(out, chunk[written:])
                        position += len(chunk)
                        view = view[len(chunk) :]
                        if position % block_size == 0:
                            blocks[position // block_size - 1] = hasher.intdigest()
                            hasher.reset()
        if position % block_size:
            blocks[position // block_size] = hasher.intdigest()
        os.fsync(out)
    finally:
        os.close(out)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return blocks


def _multipart_etag(md5s: list[str]) -> str:
    """S3's ETag of a multipart object: the MD5 of the parts' binary MD5s, then -N."""
    joined = hashlib.md5(b"".join(bytes.fromhex(md5) for md5 in md5s))
    return f'"{joined.hexdigest()}-{len(md5s)}"'


def _listed_parts(body: bytes) -> list[tuple[int, str]]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise MalformedXML("The XML you provided was not well-formed.") from exc
    parts = []
    for element in root:
        if element.tag.rsplit("}", 1)[-1] != "Part":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in element}
        number = fields.get("PartNumber", "")
        if not number.isdigit():
            raise MalformedXML("A Part has no valid PartNumber.")
        parts.append((int(number), fields.get("ETag", "")))
    return parts


def _xml(root: str, fields: list[tuple[str, str]]) -> web.Response:
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in fields)
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{_NS}">{inner}</{root}>'
    return web.Response(status=200, body=body.encode(), content_type="application/xml")


def _complete_answer(upload: _Upload, etag: str) -> web.Response:
    return _xml(
        "CompleteMultipartUploadResult",
        [
            ("Location", f"/{upload.bucket}/{upload.key}"),
            ("Bucket", upload.bucket),
            ("Key", upload.key),
            ("ETag", etag),
        ],
    )


"""Multipart uploads cached on the way (README, "Write modes"): write-through and
write-back of CreateMultipartUpload / UploadPart / CompleteMultipartUpload.

Parts are spooled (``s3cache.spool``: MD5, the client's checksums and block hashes on
the way) straight into the object's cache file where they will be in the object: the
first part of at least 5 MiB that arrives sets the upload's stride (SDKs upload parts
of one size: boto3, the AWS CLI and s3fs do), and part N of at most that size goes at
(N-1) x stride of one shared file. On completion, when the parts named are numbered
1..K and all but the last have the stride's size, that file is the object: nothing is
copied; parts that were not in place (a part sent again, a first part smaller than the
stride, a gap in the numbers) are copied into place (``copy_file_range``), and only
when the sizes differ are the parts joined into a new file. The file becomes the key's
entry (``store.adopt``):

- ``through``: every request goes to the upstream as it came; the upload is tracked
  by the upstream's UploadId; once CompleteMultipartUpload succeeded (a 200 whose body
  is not an ``<Error>``: https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html),
  a HEAD gives the entry's metadata.
- ``back``: the upload lives here until it is completed: s3cache makes the UploadId
  (``s3cache-…``) and answers each part once spooled. CompleteMultipartUpload joins and
  fsyncs the object, commits its entry and journal row (with the part sizes and MD5s),
  and answers the ETag S3 will give: the MD5 of the parts' MD5s, ``-N``. The uploader
  sends it as a multipart upload with the same part boundaries, so that ETag is what the
  upstream computes. The upload is saved in the index (``uploads``) before its UploadId
  is answered; a part is answered once its digests are checked (its Content-MD5 and
  checksum, as S3 checks them), its bytes fsync'd and its row committed
  (``upload_parts``): an upload outlives a restart (``start``). The completion's commit
  removes the upload's rows with the entry's.

Over ``writeback_max`` at completion, a write-back upload is uploaded to the upstream
there and then (its client waits, as for write-through); it never fails for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

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
    NoSuchUpload,
)
from s3cache.forward import relay_response, response_headers, send_upstream, upstream_request
from s3cache.metrics import UpstreamKind
from s3cache.s3.addressing import S3Address
from s3cache.spool import CHECKSUMS, Spool, checksum_headers, fsync_dir
from s3cache.store import files
from s3cache.store.cache import CacheStore, CacheWriteError
from s3cache.store.entry import ObjectMeta
from s3cache.store.index import UploadRow
from s3cache.upstream import Upstream
from s3cache.writes import (
    BACK,
    Changed,
    Joiner,
    Writer,
    body_length,
    promised_meta,
    replayed,
    xml_text,
)

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
    offset: int  # where its bytes are in ``path``
    size: int
    md5: str  # hex
    blocks: dict[int, int]  # xxh3-64 of the object's blocks it holds whole, if in place
    shared: bool  # in the upload's shared file (else a file of its own)


@dataclass(slots=True)
class _Upload:
    id: str
    bucket: str
    key: str
    mode: str
    headers: tuple[tuple[str, str], ...]  # CreateMultipartUpload's, as forwarded
    content_type: str | None
    stored: tuple[tuple[str, str], ...]  # what a GET will answer with (metadata…)
    dir_number: int  # the cache dir its spool dir is in
    dir: Path  # parts that are not in the shared file
    parts: dict[int, _Part] = field(default_factory=dict)
    stride: int | None = None  # part N of at most this size goes at (N-1) x stride
    shared: tuple[int, str, Path] | None = None  # the shared file: from store.new_file
    writing: set[int] = field(default_factory=set)  # parts being written into it
    completing: bool = False
    quiet: asyncio.Event = field(default_factory=asyncio.Event)  # nothing being written


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
        """The write-back uploads a stop interrupted go on (their saved rows, with
        their acknowledged parts whose bytes are still there); other spooled parts are
        of no use: removed."""
        for row in self._store.uploads_at_open:
            upload = self._restored(row)
            self._uploads[upload.id] = upload
        keep = {upload.dir for upload in self._uploads.values()}
        await asyncio.get_running_loop().run_in_executor(None, _remove_spools, self._dirs, keep)

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
            upload = self._new_upload(upload_id, address, mode, headers, request)
            # Durable before its UploadId is answered: the upload outlives a restart.
            await self._store.save_upload(upload.id, upload.bucket, upload.key, _state(upload))
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
    ) -> _Upload:
        assert address.bucket is not None and address.key is not None
        directory = files.choose_dir(address.bucket, address.key, len(self._dirs))
        meta = promised_meta(request, "", 0, time.time(), ())
        upload = self._uploads[upload_id] = _Upload(
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
            dir_number=directory,
            dir=self._dirs[directory] / SPOOL_DIR / upload_id.replace("/", "_")[:96],
        )
        return upload

    def _restored(self, row: UploadRow) -> _Upload:
        """A saved write-back upload as it was, with those of its parts whose bytes are
        where its rows say."""
        state = json.loads(row.state)
        upload = _Upload(
            id=row.id,
            bucket=row.bucket,
            key=row.key,
            mode=BACK,
            headers=_pairs(state["headers"]),
            content_type=state["content_type"],
            stored=_pairs(state["stored"]),
            dir_number=state["dir"],
            dir=Path(self._dirs[state["dir"]]) / SPOOL_DIR / row.id.replace("/", "_")[:96],
            stride=state["stride"],
        )
        if row.shared is not None:
            upload.shared = (*row.shared, self._store.file_at(row.shared))
        upload.quiet.set()
        for number, text in row.parts.items():
            part = json.loads(text)
            if part["file"] is None:
                if upload.shared is None:
                    continue
                path = upload.shared[2]
            else:
                path = upload.dir / part["file"]
            with contextlib.suppress(OSError):
                if path.stat().st_size >= part["offset"] + part["size"]:
                    upload.parts[number] = _Part(
                        path, part["offset"], part["size"], part["md5"],
                        {int(index): value for index, value in part["blocks"]},
                        shared=part["file"] is None,
                    )
        return upload

    # --- parts -------------------------------------------------------------------

    async def _part(
        self, request: web.Request, address: S3Address, upload: _Upload
    ) -> web.StreamResponse:
        number_text = address.param("partNumber") or ""
        if not number_text.isdigit() or not 1 <= int(number_text) <= 10000:
            raise InvalidArgument("Part number must be an integer between 1 and 10000.")
        if upload.completing:
            raise InvalidRequest("The upload is being completed.")
        number = int(number_text)
        checks = []
        if upload.mode == BACK:
            checks = checksum_headers(request.headers)
            for name in request.headers:
                lower = name.lower()
                if lower.startswith("x-amz-checksum-") and not (
                    lower in CHECKSUMS or lower in _PART_CHECKSUMS
                ):
                    raise InvalidRequest(f"{name} is not supported for a write-back upload.")
        headers, body = upstream_request(request)
        spool = await self._spool(upload, number, body_length(request), checks)
        answer: web.StreamResponse
        try:
            if upload.mode == BACK:
                async for _ in spool.tee(body):
                    pass
                if not await spool.finish(durable=True):
                    raise CacheWriteError("cannot spool the part")
                spool.check_digests(request)
                kept = True
                answer = web.Response(status=200, headers=self._part_answer(request, spool))
            else:
                url = self._upstream.url(address.bucket, address.key, address.query)
                response = await self._upstream.request(
                    "PUT", url, headers, spool.tee(body) if body is not None else None,
                    kind=_FORWARD,
                )
                async with response:
                    kept = await spool.finish(durable=False) and response.status < 300
                    answer = await relay_response(request, response)
        except BaseException:
            await self._drop(upload, number, spool)
            raise
        if not kept:
            await self._drop(upload, number, spool)
            return answer
        part = _Part(
            spool.path, spool.offset, spool.size, spool.md5_hex, spool.blocks,
            shared=self._is_shared(upload, spool),
        )
        if upload.mode == BACK:
            try:
                # Durable before it is answered: it outlives a restart with its upload.
                saved = await self._store.save_part(
                    upload.id, number, _part_state(part), _state(upload),
                    upload.shared[:2] if upload.shared is not None else None,
                )
            except BaseException:
                await self._drop(upload, number, spool)
                raise
            if not saved:
                await self._drop(upload, number, spool)
                raise NoSuchUpload("The specified upload does not exist.")
        old = upload.parts.pop(number, None)
        if old is not None and not old.shared:
            await _remove(old.path)
        upload.parts[number] = part
        self._written(upload, number, spool)
        return answer

    async def _spool(
        self, upload: _Upload, number: int, length: int | None, checks: list[str]
    ) -> Spool:
        """Where part ``number`` is spooled: its place in the shared file if it can go
        there, else a file of its own."""
        block_size = self._store.block_size
        if upload.stride is None and length is not None and length >= MIN_PART:
            upload.stride = length
        stride = upload.stride
        if (
            stride is not None
            and length is not None
            and length <= stride
            and number not in upload.parts
            and number not in upload.writing
            and number * stride <= self._store.capacity
        ):
            try:
                if upload.shared is None:
                    upload.shared = self._store.new_file(upload.bucket, upload.key)
                spool = Spool(
                    upload.shared[2], block_size, offset=(number - 1) * stride, shared=True,
                    checks=checks, limit=stride,
                )
                upload.writing.add(number)
                upload.quiet.clear()
                try:
                    await spool.open()
                except BaseException:
                    self._written(upload, number, spool)
                    raise
                return spool
            except (CacheWriteError, OSError) as exc:
                log.warning("part %d of %s: not in place (%s)", number, upload.id, exc)
        await aiofiles.os.makedirs(upload.dir, exist_ok=True)
        path = upload.dir / f"{number:05d}.{secrets.token_hex(4)}"
        spool = Spool(path, block_size, checks=checks)
        await spool.open()
        return spool

    def _is_shared(self, upload: _Upload, spool: Spool) -> bool:
        return upload.shared is not None and spool.path == upload.shared[2]

    def _written(self, upload: _Upload, number: int, spool: Spool) -> None:
        if self._is_shared(upload, spool):
            upload.writing.discard(number)
            if not upload.writing:
                upload.quiet.set()

    async def _drop(self, upload: _Upload, number: int, spool: Spool) -> None:
        """A part that will not be kept."""
        if self._is_shared(upload, spool):
            await spool.close()
        else:
            await spool.discard()
        self._written(upload, number, spool)

    def _part_answer(self, request: web.Request, spool: Spool) -> CIMultiDict[str]:
        answer = CIMultiDict({"ETag": f'"{spool.md5_hex}"'})
        for name in spool.checks:
            answer[name] = request.headers[name]
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
        try:
            if not self._writer.room_for(size):
                sources = [(part.path, part.offset, part.size, part.md5) for part in parts]
                await self._writer.upload_now(upload.bucket, upload.key, upload.headers, sources)
                await changed()
            else:
                await self._writer.keep_back(
                    upload.bucket, upload.key, meta, upload.headers, sizes,
                    self._assembler(upload, parts, durable=True), changed,
                    completed_upload=upload.id,
                )
        finally:
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

    def _assembler(self, upload: _Upload, parts: list[_Part], *, durable: bool) -> Joiner:
        """What makes the object's file of ``parts``: the shared file with the parts not
        in place copied into it, or (part sizes that differ) a new file they are joined
        into; block hashes of what was not hashed on the way; fsync'd if ``durable``."""

        async def assemble() -> tuple[tuple[int, str], Path, dict[int, int]]:
            upload.completing = True  # no part goes into the shared file any more
            if upload.writing:
                await upload.quiet.wait()
            stride = upload.stride
            block_size = self._store.block_size
            in_place = upload.shared is not None and all(
                part.size == stride for part in parts[:-1]
            )
            if in_place:
                assert upload.shared is not None and stride is not None
                directory, name, target = upload.shared
                upload.shared = None  # it is the object's now: _forget leaves it
                offsets = [index * stride for index in range(len(parts))]
            else:
                directory, name, target = self._store.new_file(upload.bucket, upload.key)
                offsets = list(itertools.accumulate((part.size for part in parts), initial=0))
            moves = []
            blocks: dict[int, int] = {}
            for part, offset in zip(parts, offsets, strict=False):
                if not (in_place and part.shared and part.offset == offset):
                    moves.append((part.path, part.offset, part.size, offset))
                    continue
                last = part is parts[-1]  # (its last block may be partial)
                blocks.update(
                    (index, value)
                    for index, value in part.blocks.items()
                    if last or (index + 1) * block_size <= offset + part.size
                )
            size = sum(part.size for part in parts)
            try:
                blocks = await asyncio.get_running_loop().run_in_executor(
                    None, _assemble, target, moves, size, block_size, blocks, durable
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(target)
                self._store.release_file(name)
                raise
            return (directory, name), target, blocks

        return assemble

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
            try:
                parts = [upload.parts[number] for number, _ in listed if number in upload.parts]
                if len(parts) == len(listed) and etag:
                    size = sum(part.size for part in parts)
                    await self._writer.keep_through(
                        upload.bucket, upload.key, etag, size,
                        self._assembler(upload, parts, durable=False),
                    )
            finally:
                await self._forget(upload)
        return web.Response(status=status, headers=headers, body=answer)

    async def _forget(self, upload: _Upload) -> None:
        self._uploads.pop(upload.id, None)
        if upload.mode == BACK:
            await self._store.forget_upload(upload.id)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, shutil.rmtree, upload.dir, True)
        if upload.shared is not None:
            _, name, path = upload.shared
            upload.shared = None
            await _remove(path)
            self._store.release_file(name)


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


def _assemble(
    target: Path,
    moves: list[tuple[Path, int, int, int]],
    size: int,
    block_size: int,
    blocks: dict[int, int],
    durable: bool,
) -> dict[int, int]:
    """Copy each (file, offset, size) of ``moves`` to its offset in ``target`` (in
    order: a part only ever moves to a lower offset of the same file, never over one
    still to move), cut ``target`` to ``size``, hash the blocks ``blocks`` lacks; fsync
    if ``durable``. Every block's xxh3-64."""
    target.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for path, offset, length, to in moves:
            source = out if path == target else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_range(source, offset, out, to, length)
            finally:
                if source != out:
                    os.close(source)
        os.ftruncate(out, size)
        hashed = dict(blocks)
        for index in range((size + block_size - 1) // block_size):
            if index not in hashed:
                start = index * block_size
                hashed[index] = xxhash.xxh3_64_intdigest(
                    os.pread(out, min(block_size, size - start), start)
                )
        if durable:
            os.fsync(out)
    finally:
        os.close(out)
    if durable:
        fsync_dir(target)
    return hashed


def _copy_range(source: int, offset: int, target: int, to: int, length: int) -> None:
    """``length`` bytes from ``offset`` of ``source`` to ``to`` of ``target``, in the
    kernel where it can (copy_file_range), else through a buffer."""
    while length:
        try:
            copied = os.copy_file_range(source, target, min(length, _JOIN_PIECE), offset, to)
        except OSError:
            copied = 0
        if copied <= 0:
            piece = os.pread(source, min(length, _JOIN_PIECE), offset)
            if not piece:
                raise OSError("a part's file ended early")
            copied = os.pwrite(target, piece, to)
        offset, to, length = offset + copied, to + copied, length - copied


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



def _state(upload: _Upload) -> str:
    """What a write-back upload's row saves of it (its parts have rows of their own)."""
    return json.dumps(
        {
            "headers": upload.headers,
            "content_type": upload.content_type,
            "stored": upload.stored,
            "stride": upload.stride,
            "dir": upload.dir_number,
        }
    )


def _part_state(part: _Part) -> str:
    return json.dumps(
        {
            "file": None if part.shared else part.path.name,
            "offset": part.offset,
            "size": part.size,
            "md5": part.md5,
            "blocks": sorted(part.blocks.items()),
        }
    )


def _pairs(items: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in items)


def _remove_spools(cache_dirs: tuple[Path, ...], keep: set[Path]) -> None:
    """Every upload's spool dir but those of ``keep``."""
    for directory in cache_dirs:
        spool = directory / SPOOL_DIR
        with contextlib.suppress(FileNotFoundError):
            for path in spool.iterdir():
                if path not in keep:
                    shutil.rmtree(path, ignore_errors=True)

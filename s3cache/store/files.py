"""Block files: one sparse file per object version, named by a hash (no client-chosen
name ever reaches the filesystem), spread over the cache directories.

Every function here blocks; callers run them in an executor.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from s3cache.hashing import ranked

DATA_DIR = "data"
VERIFY_PIECE = 1024 * 1024


def file_name(bucket: str, key: str, etag: str, nonce: str = "") -> str:
    """Every entry gets a new file (``nonce``, random): versions never share bytes, and
    a late unlink of a dropped entry's file (or the orphan sweep) can never remove the
    file of a newer entry of the same version."""
    return xxhash.xxh3_128_hexdigest(f"{bucket}\0{key}\0{etag}\0{nonce}".encode())


def choose_dir(bucket: str, key: str, dir_count: int) -> int:
    """Rendezvous hashing over the directories: adding a drive moves only its share."""
    return int(ranked(f"{bucket}/{key}", [str(i) for i in range(dir_count)])[0])


def file_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / DATA_DIR / name[:2] / name


def create_sparse(path: Path, size: int) -> int:
    """Create (or truncate) the file at ``size`` bytes, all holes; return an fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def open_or_create(path: Path, size: int) -> int:
    """Open the file, creating it sparse at ``size`` bytes if it is missing or empty
    (never truncating bytes that are there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size == 0:
        os.ftruncate(fd, size)
    return fd


def open_existing(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def write_at(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def read_at(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def corrupt_blocks(fd: int, blocks: list[tuple[int, int, int, int]]) -> list[int]:
    """Of (block, offset, length, xxh3-64) tuples, the blocks whose bytes in the file
    do not hash to the recorded value."""
    bad = []
    for block, offset, length, expected in blocks:
        hasher = xxhash.xxh3_64()
        position, end = offset, offset + length
        while position < end:
            piece = os.pread(fd, min(VERIFY_PIECE, end - position), position)
            if not piece:
                break
            hasher.update(piece)
            position += len(piece)
        if position != end or hasher.intdigest() != expected:
            bad.append(block)
    return bad


def corrupt_blocks_in(path: Path, blocks: list[tuple[int, int, int, int]]) -> list[int]:
    """corrupt_blocks() of a file that is not open."""
    fd = open_existing(path)
    try:
        return corrupt_blocks(fd, blocks)
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def probe_writable(cache_dir: Path) -> None:
    """Create, write, sync and remove a small file; raise OSError if the dir refuses."""
    probe = cache_dir / DATA_DIR / ".probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"s3cache")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def older_than(path: Path, moment: float) -> bool:
    """True if the file was last changed before ``moment`` (a time.time() value)."""
    try:
        return path.stat().st_mtime < moment
    except FileNotFoundError:
        return False


def list_files(cache_dir: Path) -> list[str]:
    """Every block file name under a cache dir (used by the background orphan sweep)."""
    root = cache_dir / DATA_DIR
    if not root.is_dir():
        return []
    return [name for sub in os.scandir(root) if sub.is_dir() for name in os.listdir(sub.path)]

"""Block files: one sparse file per object version, named by a hash (no client-chosen
name ever reaches the filesystem), spread over the cache directories.

Every function here blocks; callers run them in an executor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

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


class Stamp(NamedTuple):
    """What fstat says of an open cache file: another process that deletes, truncates
    or writes it changes one of these (``st_ctime`` cannot be set back from user space)."""

    size: int
    links: int
    ctime_ns: int


def stamp(fd: int) -> Stamp:
    """Cheap (no disk I/O: the inode of an open file is in memory), so the loop may
    call it before serving a hit."""
    st = os.fstat(fd)
    return Stamp(st.st_size, st.st_nlink, st.st_ctime_ns)


def _make_parent(path: Path) -> None:
    """The file's directory, made if missing; a plain file in its place (left there by
    something else than s3cache) is removed first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        path.parent.unlink()
        path.parent.mkdir()


def create_sparse(path: Path, size: int) -> int:
    """Create (or truncate) the file at ``size`` bytes, all holes; return an fd."""
    _make_parent(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def recreate_sparse(path: Path, size: int) -> tuple[int, Stamp]:
    """Whatever is at ``path`` (a damaged file, a directory) replaced by a new sparse
    file of ``size`` bytes; its fd and stamp."""
    remove_any(path)
    fd = create_sparse(path, size)
    return fd, stamp(fd)


def open_or_create(path: Path, size: int) -> tuple[int, Stamp]:
    """Open the file, creating it sparse at ``size`` bytes if it is missing or empty
    (never truncating bytes that are there)."""
    _make_parent(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_size == 0:
        os.ftruncate(fd, size)
    return fd, stamp(fd)


def open_existing(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def open_stamped(path: Path) -> tuple[int, Stamp]:
    fd = open_existing(path)
    return fd, stamp(fd)


def write_at(fd: int, offset: int, data: bytes | memoryview) -> Stamp:
    """Write all of ``data`` at ``offset``; the file's stamp after the write."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]
    return stamp(fd)


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


class Inspection(NamedTuple):
    """What checking a cache file against its index rows found."""

    problem: str | None  # None, "missing" (or not a readable file), "truncated", "corrupt"
    bad: list[int]  # blocks whose bytes do not hash to their recorded value
    detail: str = ""


def inspect(fd: int, size: int, blocks: list[tuple[int, int, int, int]]) -> Inspection:
    """Check an open file of an object of ``size`` bytes: deleted (no link left),
    shorter than the object, or with damaged blocks."""
    st = os.fstat(fd)
    bad = corrupt_blocks(fd, blocks)
    if st.st_nlink == 0:
        return Inspection("missing", bad, "the file was deleted")
    if st.st_size < size:
        return Inspection("truncated", bad, f"{st.st_size} of {size} bytes")
    return Inspection("corrupt" if bad else None, bad)


def inspect_path(path: Path, size: int, blocks: list[tuple[int, int, int, int]]) -> Inspection:
    """inspect() of a file that is not open. A file that cannot be opened (missing, a
    directory, unreadable) is "missing": none of its blocks can be served."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if not blocks:
            # A crash between the row's commit and the file's creation: nothing is
            # lost, the file is created when the entry is next used.
            return Inspection(None, [])
        return Inspection("missing", [block for block, *_ in blocks], _describe(exc))
    except OSError as exc:
        return Inspection("missing", [block for block, *_ in blocks], _describe(exc))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Inspection("missing", [block for block, *_ in blocks], "not a regular file")
        return inspect(fd, size, blocks)
    except OSError as exc:
        return Inspection("missing", [block for block, *_ in blocks], _describe(exc))
    finally:
        os.close(fd)


def restore_size(path: Path, size: int) -> None:
    """Give a truncated file its length back (holes: its lost blocks are refetched)."""
    try:
        fd = open_existing(path)
    except FileNotFoundError:
        return  # evicted meanwhile
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({name})" if name else str(exc)


def unlink(path: Path) -> None:
    """Remove the file if it is there (a missing directory on the way is no error)."""
    # NotADirectoryError: a file where the file's directory should be: no file here.
    with contextlib.suppress(NotADirectoryError):
        path.unlink(missing_ok=True)


def remove_any(path: Path) -> None:
    """Remove whatever is at ``path``: a file, or a directory put in a file's place."""
    try:
        unlink(path)
    except (IsADirectoryError, PermissionError):
        if not path.is_dir():
            raise
        shutil.rmtree(path)


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


class DiskSpace(NamedTuple):
    device: int  # st_dev: dirs on one filesystem share its space
    free: int  # bytes an unprivileged writer may still use
    total: int


def disk_space(cache_dir: Path) -> DiskSpace:
    fs = os.statvfs(cache_dir)
    device = os.stat(cache_dir).st_dev
    return DiskSpace(device, fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize)


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
    return [
        name
        for sub in os.scandir(root)
        if sub.is_dir(follow_symlinks=False)
        for name in os.listdir(sub.path)
    ]

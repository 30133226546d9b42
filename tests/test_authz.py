"""Authorization covers every object an operation names: the copy source of CopyObject
and UploadPartCopy, every key in a DeleteObjects body, the prefix of every listing, the
whole bucket for bucket operations — whatever else the query says — and the form an
upstream that folds ``//`` or resolves ``..`` reads a key in.

The unit tests check ``s3.access.touches`` and ``server.auth.granted``; the end-to-end
tests run s3cache with client keys of each kind (read-only glob, read-write glob,
read-write bucket) in front of a real SeaweedFS behind a counting relay, and check both
the answer and that a denied request never reached the upstream."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from s3cache.config import ClientKey
from s3cache.errors import AccessDenied, InvalidArgument, MalformedXML
from s3cache.s3.access import Action, Scope, Touch, copy_source_of, key_forms, touches
from s3cache.s3.addressing import resolve
from s3cache.sandbox.proxy import S3CacheProcess
from s3cache.sandbox.relay import Relay
from s3cache.sandbox.seaweed import SeaweedS3
from s3cache.server.auth import granted
from tests.test_security import client

READER = ("glob-reader", "glob-reader-secret-0123")  # read-only, BUCKET/public/*
TEAM = ("glob-writer", "glob-writer-secret-0123")  # read-write, BUCKET/team/*
OWNER = ("bucket-writer", "bucket-writer-secret-01")  # read-write, the whole BUCKET


# -- what a request touches ----------------------------------------------------------------


def _touches(method: str, target: str, headers: dict[str, str] | None = None) -> list[Touch]:
    return touches(method, resolve("127.0.0.1", target, ()), headers or {})


def obj(action: Action, key: str, bucket: str = "bkt") -> Touch:
    return Touch(action, Scope.OBJECT, bucket, key)


def test_object_operations_touch_their_object_and_copy_source() -> None:
    assert _touches("GET", "/bkt/k?tagging") == [obj(Action.READ, "k")]
    assert _touches("HEAD", "/bkt/k") == [obj(Action.READ, "k")]
    assert _touches("GET", "/bkt/k?uploadId=1") == [obj(Action.READ, "k")]  # ListParts
    assert _touches("POST", "/bkt/k?select&select-type=2") == [obj(Action.READ, "k")]
    assert _touches("DELETE", "/bkt/k?prefix=x/") == [obj(Action.WRITE, "k")]
    assert _touches("POST", "/bkt/k?uploads") == [obj(Action.WRITE, "k")]
    copy = {"x-amz-copy-source": "/src/dir%2Fa%20b?versionId=3"}
    assert _touches("PUT", "/bkt/k", copy) == [
        obj(Action.WRITE, "k"),
        obj(Action.READ, "dir/a b", "src"),
    ]
    assert _touches("PUT", "/bkt/k?partNumber=1&uploadId=u", {"x-amz-copy-source": "bkt/s"}) == [
        obj(Action.WRITE, "k"),
        obj(Action.READ, "s"),
    ]


def test_copy_sources_that_name_no_object_are_refused() -> None:
    for header in ("", "/", "bucket", "bucket/", "/bucket/"):
        with pytest.raises(InvalidArgument):
            copy_source_of(header)
    with pytest.raises(AccessDenied):
        copy_source_of("arn:aws:s3:us-east-1:1:accesspoint/ap/object/k")
    assert copy_source_of("b/%3Fq?versionId=1") == ("b", "?q")


def test_listings_touch_their_prefix_and_nothing_else_does() -> None:
    listing = Touch(Action.LIST, Scope.PREFIX, "bkt", "p/")
    assert _touches("GET", "/bkt?list-type=2&prefix=p/&delimiter=/") == [listing]
    assert _touches("GET", "/bkt?versions&prefix=p/") == [listing]
    assert _touches("GET", "/bkt?uploads&prefix=p/") == [listing]
    assert _touches("GET", "/bkt") == [Touch(Action.LIST, Scope.PREFIX, "bkt", "")]
    assert _touches("GET", "/bkt?prefix=p/&prefix=q/") == [
        listing,
        Touch(Action.LIST, Scope.PREFIX, "bkt", "q/"),
    ]
    probe = [Touch(Action.READ, Scope.IN_BUCKET, "bkt")]
    assert _touches("HEAD", "/bkt") == probe
    assert _touches("GET", "/bkt?location") == probe
    # A prefix parameter never narrows a bucket operation.
    assert _touches("GET", "/bkt?acl&prefix=p/") == [Touch(Action.READ, Scope.BUCKET, "bkt")]
    assert _touches("PUT", "/bkt?policy&prefix=p/") == [Touch(Action.WRITE, Scope.BUCKET, "bkt")]
    assert _touches("DELETE", "/bkt?prefix=p/") == [Touch(Action.WRITE, Scope.BUCKET, "bkt")]
    assert _touches("POST", "/bkt?delete&prefix=p/") == [Touch(Action.WRITE, Scope.BUCKET, "bkt")]
    assert _touches("GET", "/") == [Touch(Action.LIST, Scope.SERVICE)]


def delete_document(*keys: str) -> bytes:
    objects = "".join(f"<Object><Key>{key}</Key></Object>" for key in keys)
    return f'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{objects}</Delete>'.encode()


def test_delete_objects_touches_every_key_in_its_body() -> None:
    address = resolve("127.0.0.1", "/bkt?delete", ())
    body = delete_document("p/a", "q/b")
    expected = [obj(Action.WRITE, "p/a"), obj(Action.WRITE, "q/b")]
    assert touches("POST", address, {}, body) == expected
    # Every Key the document holds, wherever a lenient parser might find one.
    sneaky = b"<Delete><Object><Key>p/a</Key><Key>q/b</Key></Object><x><Object><Key>r</Key>"
    sneaky += b"</Object></x><Object><Key>s<!-- -->t</Key></Object></Delete>"
    assert [t.name for t in touches("POST", address, {}, sneaky)] == ["p/a", "q/b", "r", "st"]
    for bad in (
        b"<Delete><Object><Key>p/a</Key></Object>",
        b'<!DOCTYPE d [<!ENTITY e "q/b">]><Delete><Object><Key>&e;</Key></Object></Delete>',
        delete_document(*[f"k{n}" for n in range(1001)]),
    ):
        with pytest.raises(MalformedXML):
            touches("POST", address, {}, bad)


def test_key_forms_fold_what_an_upstream_may_fold() -> None:
    assert key_forms("b", "plain/key") == [("b", "plain/key")]
    assert key_forms("b", "p/../q/k") == [("b", "p/../q/k"), ("b", "q/k")]
    assert key_forms("b", "p//k") == [("b", "p//k"), ("b", "p/k")]
    assert key_forms("b", "p/./dir/") == [("b", "p/./dir/"), ("b", "p/dir/")]
    assert key_forms("b", "../other/k") == [("b", "../other/k"), ("other", "k")]
    assert key_forms("b", "..") == [("b", ".."), ("", "")]
    assert key_forms("b", "p/..") == [("b", "p/.."), ("b", "")]


def test_grants_cover_each_touch() -> None:
    glob = ClientKey(access_key="g", secret_key="s", allow=("bkt/p/*",), read_only=False)
    whole = ClientKey(access_key="w", secret_key="s", allow=("bkt",), read_only=False)
    reader = ClientKey(access_key="r", secret_key="s", allow=("*",), read_only=True)
    assert granted(glob, obj(Action.WRITE, "p/x"))
    assert not granted(glob, obj(Action.WRITE, "q/x"))
    assert not granted(glob, obj(Action.READ, "p/../q/x"))
    assert not granted(glob, obj(Action.READ, "x", "cbk"))
    assert granted(glob, Touch(Action.LIST, Scope.PREFIX, "bkt", "p/sub"))
    assert not granted(glob, Touch(Action.LIST, Scope.PREFIX, "bkt", ""))
    assert not granted(glob, Touch(Action.LIST, Scope.PREFIX, "bkt", "p/../q/"))
    assert granted(glob, Touch(Action.READ, Scope.IN_BUCKET, "bkt"))
    assert not granted(glob, Touch(Action.READ, Scope.IN_BUCKET, "cbk"))
    assert not granted(glob, Touch(Action.WRITE, Scope.BUCKET, "bkt"))
    assert granted(whole, Touch(Action.WRITE, Scope.BUCKET, "bkt"))
    assert granted(whole, obj(Action.WRITE, "p/../q/x"))
    assert not granted(whole, obj(Action.READ, "../cbk/x"))
    assert not granted(whole, obj(Action.READ, "x", "cbk"))
    assert granted(reader, obj(Action.READ, "../cbk/x"))
    assert not granted(reader, obj(Action.WRITE, "x"))
    assert granted(reader, Touch(Action.LIST, Scope.SERVICE))


# -- through a running s3cache ---------------------------------------------------------


def denied(call: Any) -> bool:
    with pytest.raises(ClientError) as excinfo:
        call()
    error = excinfo.value.response
    return (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (
        403,
        "AccessDenied",
    )


@pytest.fixture
def keyed(tmp_path: Path, upstream: SeaweedS3, bucket: str) -> Iterator[tuple[str, Relay]]:
    """s3cache with the three client keys, behind a relay; the bucket holds
    public/a, team/a and private/b, and a second bucket holds other/c."""
    keys = tmp_path / "client-keys.toml"
    keys.write_text(
        "".join(
            f'[[client_keys]]\naccess_key = "{key[0]}"\nsecret_key = "{key[1]}"\n'
            f'allow = ["{allow}"]\naccess = "{access}"\n\n'
            for key, allow, access in (
                (READER, f"{bucket}/public/*", "read-only"),
                (TEAM, f"{bucket}/team/*", "read-write"),
                (OWNER, bucket, "read-write"),
            )
        )
    )
    direct = upstream.client()
    for key in ("public/a", "team/a", "private/b"):
        direct.put_object(Bucket=bucket, Key=key, Body=key.encode())
    other = f"{bucket}-other"
    direct.create_bucket(Bucket=other)
    direct.put_object(Bucket=other, Key="other/c", Body=b"other")
    try:
        with Relay(upstream.endpoint_url) as relay:
            proxy = S3CacheProcess(
                tmp_path,
                upstream,
                upstream_endpoint=relay.endpoint_url,
                extra_args=["--client-keys-file", str(keys)],
                debug_blocking=True,
            )
            with proxy:
                relay.reset()
                yield proxy.endpoint_url, relay
            assert proxy.blocking_calls() == []
    finally:
        direct.delete_object(Bucket=other, Key="other/c")
        direct.delete_bucket(Bucket=other)
        direct.close()


def keys_of(upstream: SeaweedS3, bucket: str) -> set[str]:
    direct = upstream.client()
    listed = direct.list_objects_v2(Bucket=bucket).get("Contents", [])
    direct.close()
    return {item["Key"] for item in listed}


def test_copy_needs_read_on_its_source(
    keyed: tuple[str, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    endpoint, relay = keyed
    team, owner = client(endpoint, TEAM), client(endpoint, OWNER)
    source_outside = {"Bucket": bucket, "Key": "private/b"}
    assert denied(lambda: team.copy_object(Bucket=bucket, Key="team/x", CopySource=source_outside))
    other = {"Bucket": f"{bucket}-other", "Key": "other/c"}
    assert denied(lambda: owner.copy_object(Bucket=bucket, Key="y", CopySource=other))
    upload = team.create_multipart_upload(Bucket=bucket, Key="team/mp")["UploadId"]
    relay.reset()
    assert denied(
        lambda: team.upload_part_copy(
            Bucket=bucket,
            Key="team/mp",
            UploadId=upload,
            PartNumber=1,
            CopySource=source_outside,
        )
    )
    assert relay.records() == []  # no denied request reached the upstream
    team.abort_multipart_upload(Bucket=bucket, Key="team/mp", UploadId=upload)
    team.copy_object(Bucket=bucket, Key="team/x", CopySource={"Bucket": bucket, "Key": "team/a"})
    owner.copy_object(Bucket=bucket, Key="z", CopySource=source_outside)
    assert team.get_object(Bucket=bucket, Key="team/x")["Body"].read() == b"team/a"
    assert keys_of(upstream, bucket) == {"public/a", "team/a", "private/b", "team/x", "z"}
    reader = client(endpoint, READER)
    public = {"Bucket": bucket, "Key": "public/a"}
    assert denied(lambda: reader.copy_object(Bucket=bucket, Key="public/x", CopySource=public))
    for c in (team, owner, reader):
        c.close()


def test_delete_objects_needs_write_on_every_key(
    keyed: tuple[str, Relay], upstream: SeaweedS3, bucket: str
) -> None:
    endpoint, relay = keyed
    team, owner, reader = (client(endpoint, key) for key in (TEAM, OWNER, READER))

    def delete(c: Any, *keys: str) -> Any:
        return c.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )

    assert denied(lambda: delete(team, "team/a", "private/b"))
    assert denied(lambda: delete(reader, "public/a"))
    assert relay.records() == []
    assert keys_of(upstream, bucket) == {"public/a", "team/a", "private/b"}  # all or nothing
    delete(team, "team/a")
    assert keys_of(upstream, bucket) == {"public/a", "private/b"}
    delete(owner, "private/b")
    assert keys_of(upstream, bucket) == {"public/a"}
    for c in (team, owner, reader):
        c.close()


def signed_request(
    endpoint: str, key: tuple[str, str], method: str, target: str, body: bytes = b""
) -> tuple[int, bytes]:
    """A request sent as written (query parameters a boto3 call would not send), signed
    with SigV4 for ``key``."""
    netloc = urlsplit(endpoint).netloc
    headers = {"Host": netloc, "Content-Length": str(len(body))}
    request = AWSRequest(method=method, url=endpoint + target, data=body, headers=headers)
    S3SigV4Auth(Credentials(*key), "s3", "us-east-1").add_auth(request)
    connection = http.client.HTTPConnection(netloc, timeout=30)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in request.headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_query_parameters_never_widen_a_grant(keyed: tuple[str, Relay], bucket: str) -> None:
    endpoint, relay = keyed
    for method, target in (
        ("GET", f"/{bucket}?acl&prefix=team/"),
        ("PUT", f"/{bucket}?tagging&prefix=team/"),
        ("DELETE", f"/{bucket}?prefix=team/"),
        ("GET", f"/{bucket}?list-type=2&prefix=team/&prefix=private/"),
        ("GET", f"/{bucket}?versions&prefix=private/"),
        ("GET", f"/{bucket}?uploads&prefix=private/"),
        ("GET", f"/{bucket}?list-type=2"),
    ):
        status, body = signed_request(endpoint, TEAM, method, target)
        assert (status, b"<Code>AccessDenied</Code>" in body) == (403, True), (target, body)
    body = delete_document("private/b")
    status, answer = signed_request(endpoint, TEAM, "POST", f"/{bucket}?delete&prefix=team/", body)
    assert status == 403 and b"<Code>AccessDenied</Code>" in answer
    assert relay.records() == []
    team = client(endpoint, TEAM)
    assert [item["Key"] for item in team.list_objects_v2(Bucket=bucket, Prefix="team/")["Contents"]]
    assert team.list_multipart_uploads(Bucket=bucket, Prefix="team/")["Bucket"] == bucket
    team.head_bucket(Bucket=bucket)  # any grant in a bucket may see that it exists
    with pytest.raises(ClientError) as excinfo:  # a HEAD answer has no body to name a code
        team.head_bucket(Bucket=f"{bucket}-other")
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    team.close()


def test_no_path_form_reaches_another_prefix(keyed: tuple[str, Relay], bucket: str) -> None:
    endpoint, relay = keyed
    for target in (
        f"/{bucket}/public/../private/b",
        f"/{bucket}/public/%2E%2E/private/b",
        f"/{bucket}/public/./../private/b",
        f"/{bucket}/public/../../{bucket}-other/other/c",
    ):
        status, body = signed_request(endpoint, READER, "GET", target)
        assert (status, b"<Code>AccessDenied</Code>" in body) == (403, True), (target, body)
    assert relay.records() == []
    assert signed_request(endpoint, READER, "GET", f"/{bucket}/public/a") == (200, b"public/a")

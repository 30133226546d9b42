"""Who is asking, and may they? Client requests are verified with SigV4 (or SigV2,
unless ``allow_sigv2`` is off) exactly as S3 does (``s3.signatures``) against the
configured client keys; then everything the request touches (``s3.access``: its object,
a copy source, the keys of a DeleteObjects body, a listing's prefix, the bucket) must be
covered by what the key grants. A denied request never reaches the upstream.

With no client keys configured, clients must sign with the credentials s3cache itself
uses upstream (full access). Unsigned requests are refused unless ``allow_anonymous``,
which lets them read (GET, HEAD, listings) with s3cache's rights.

Admin actions need the admin key (``Authorization: Bearer …``), or come from the
loopback interface when no admin key is set.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
from datetime import UTC, datetime

from aiohttp import web

from s3cache.config import ClientKey, LiveSettings
from s3cache.errors import AccessDenied
from s3cache.forward import BODY_TIMEOUT, VERIFIED
from s3cache.s3.access import Action, Scope, Touch, key_forms, touches
from s3cache.s3.addressing import S3Address
from s3cache.s3.signatures import verify_request
from s3cache.s3.sigv4 import Unsigned
from s3cache.server.workerlink import CLIENT_ADDRESS
from s3cache.upstream import Upstream

ANONYMOUS = "anonymous"
_READ_METHODS = frozenset({"GET", "HEAD"})
# Unsigned requests, where allow_anonymous lets them read with s3cache's rights.
_ANONYMOUS_READER = ClientKey(access_key=ANONYMOUS, secret_key="", allow=("*",), read_only=True)


class Authenticator:
    def __init__(self, settings: LiveSettings, upstream: Upstream) -> None:
        self._settings = settings
        self._upstream = upstream
        self._upstream_key: ClientKey | None = None

    def authorize(
        self, request: web.Request, address: S3Address, delete_body: bytes | None = None
    ) -> str:
        """The access key that signed the request, once its grants cover everything
        the request touches (``s3.access``; ``delete_body``: a DeleteObjects body
        already read); raises an S3 error (403, or 400 for a malformed signature) otherwise."""
        key = self.authenticate(request, address)
        self.permit(key, request, address, delete_body)
        return key.access_key

    def permit(
        self,
        key: ClientKey,
        request: web.Request,
        address: S3Address,
        delete_body: bytes | None = None,
    ) -> None:
        """Raise AccessDenied unless ``key``'s grants cover all the request touches."""
        for touch in touches(request.method, address, request.headers, delete_body):
            if not granted(key, touch):
                raise AccessDenied("Access Denied", resource=address.resource)

    def authenticate(self, request: web.Request, address: S3Address) -> ClientKey:
        """The client key whose signature the request carries (or the anonymous
        reader); raises an S3 error (403, or 400 for a malformed signature) otherwise."""
        settings = self._settings.current
        request[BODY_TIMEOUT] = settings.body_timeout
        try:
            verified = verify_request(
                request.method,
                request.raw_path,
                request.headers,
                self._secret,
                now=datetime.now(UTC),
                allow_sigv2=settings.allow_sigv2,
                virtual_host_bucket=address.bucket if address.virtual_host else None,
            )
        except Unsigned:
            if settings.allow_anonymous and request.method in _READ_METHODS:
                return _ANONYMOUS_READER
            raise AccessDenied("Access Denied", resource=address.resource) from None
        key = self._key(verified.access_key)
        if key is None:
            raise AccessDenied("Access Denied", resource=address.resource)
        request[VERIFIED] = verified
        return key

    def _key(self, access_key: str) -> ClientKey | None:
        configured = self._settings.current.client_keys
        if configured:
            return next((k for k in configured if k.access_key == access_key), None)
        upstream = self._upstream.current_credentials
        if upstream is None or upstream.access_key != access_key:
            return None
        key = self._upstream_key
        if key is None or (key.access_key, key.secret_key) != (
            upstream.access_key,
            upstream.secret_key,
        ):
            # Made again only when the upstream's credentials change (rotation).
            key = self._upstream_key = ClientKey(
                access_key=upstream.access_key,
                secret_key=upstream.secret_key,
                allow=("*",),
                read_only=False,
            )
        return key

    def _secret(self, access_key: str) -> str | None:
        key = self._key(access_key)
        return key.secret_key if key is not None else None

    def admin_allowed(self, request: web.Request) -> bool:
        """The admin key as a bearer token; with none configured, loopback peers only."""
        admin_key = self._settings.current.admin_key
        if admin_key is None:
            return _is_loopback(request)
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(offered.encode(), admin_key.encode())


def granted(key: ClientKey, touch: Touch) -> bool:
    """Whether one of the key's grants covers what the request touches."""
    if key.read_only and touch.action is Action.WRITE:
        return False
    if touch.scope is Scope.SERVICE:
        return True  # ListBuckets: every key may see the bucket list
    if touch.scope is Scope.OBJECT:
        return all(
            any(_covers_key(pattern, bucket, key_form) for pattern in key.allow)
            for bucket, key_form in key_forms(touch.bucket, touch.name)
        )
    return any(_covers_bucket(pattern, touch) for pattern in key.allow)


def _covers_key(pattern: str, bucket: str, key: str) -> bool:
    """``*``; ``bucket`` (all of it); ``bucket/glob`` (fnmatch on the key)."""
    if pattern == "*":
        return True
    pattern_bucket, slash, key_pattern = pattern.partition("/")
    if not bucket or not fnmatch.fnmatchcase(bucket, pattern_bucket):
        return False
    return not slash or key_pattern in ("", "*") or fnmatch.fnmatchcase(key, key_pattern)


def _covers_bucket(pattern: str, touch: Touch) -> bool:
    """A listing is covered under a prefix all of whose keys the glob matches; anything
    in the bucket, by any grant in it; the whole bucket, by a whole-bucket grant."""
    if pattern == "*":
        return True
    pattern_bucket, slash, key_pattern = pattern.partition("/")
    if not fnmatch.fnmatchcase(touch.bucket, pattern_bucket):
        return False
    if not slash or key_pattern in ("", "*") or touch.scope is Scope.IN_BUCKET:
        return True
    if touch.scope is Scope.PREFIX:
        literal = key_pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        return key_pattern.endswith("*") and all(
            key_form.startswith(literal) and bucket == touch.bucket
            for bucket, key_form in key_forms(touch.bucket, touch.name)
        )
    return False


def _is_loopback(request: web.Request) -> bool:
    """The client is on this host. (A request a secondary worker passed on carries its
    client's address, checked by the worker signature.)"""
    address = request.get(CLIENT_ADDRESS)
    if address is None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = peer[0] if isinstance(peer, tuple) else None
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False

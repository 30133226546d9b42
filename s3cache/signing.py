"""One signer for the requests s3cache sends itself: from node to node (the cluster
secret, ``cluster``) and from a secondary worker to its primary (the run's secret,
``server.workerlink``).

A claim is ``STAMP:HEX``: STAMP the signing time in whole seconds since the epoch, HEX
the HMAC-SHA256 under the shared secret of STAMP and the signed fields, one a line
(``STAMP\\nFIELD\\nFIELD…``). A claim is good within WINDOW seconds of its stamp, either
way (clocks of nodes differ a little). What the fields are is the caller's: the method
and request target for a peer; the worker's index, the method, the target and the
client's address for a worker.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from s3cache.errors import AccessDenied

WINDOW = 300.0  # seconds a claim's stamp may be off
# The headers the claims travel in: a peer node's (``cluster``); a secondary worker's,
# and the client's address it vouches for (``server.workerlink``). Each is for the hop
# it was sent on, never passed on further (to the upstream, to a peer).
PEER_HEADER = "X-S3cache-Peer"
WORKER_HEADER = "X-S3cache-Worker"
CLIENT_HEADER = "X-S3cache-Client"
CLAIM_HEADERS = frozenset(name.lower() for name in (PEER_HEADER, WORKER_HEADER, CLIENT_HEADER))


class Signer:
    """Signs and checks claims with one secret; ``name`` ("cluster", "worker") goes into
    the AccessDenied messages. An empty secret signs nothing that verifies."""

    __slots__ = ("_name", "_secret")

    def __init__(self, secret: str, name: str) -> None:
        self._secret = secret.encode()
        self._name = name

    def sign(self, *fields: str, now: float | None = None) -> str:
        stamp = str(int(time.time() if now is None else now))
        message = "\n".join((stamp, *fields)).encode()
        return f"{stamp}:{hmac.new(self._secret, message, hashlib.sha256).hexdigest()}"

    def verify(self, claim: str, *fields: str) -> None:
        """Return if ``claim`` signs ``fields``; AccessDenied if not, or if it expired."""
        stamp, _, _ = claim.partition(":")
        if not self._secret or not stamp.isdigit():
            raise AccessDenied(f"Bad {self._name} signature.")
        if abs(time.time() - int(stamp)) > WINDOW:
            raise AccessDenied(f"{self._name.capitalize()} signature expired.")
        expected = self.sign(*fields, now=int(stamp))
        if not hmac.compare_digest(expected.encode(), claim.encode()):
            raise AccessDenied(f"Bad {self._name} signature.")

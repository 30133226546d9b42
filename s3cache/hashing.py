"""Rendezvous (highest random weight) hashing with xxh3: which node owns a name.

Every node ranks the candidates the same way, without coordination; adding or removing
one of N candidates moves about 1/N of the names. Used for cache directories within a
node and for peers within a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash


def ranked(name: str, candidates: Sequence[str]) -> list[str]:
    """The candidates, best owner of ``name`` first."""
    encoded = name.encode()
    return sorted(
        candidates,
        key=lambda candidate: xxhash.xxh3_64_intdigest(candidate.encode() + b"\0" + encoded),
        reverse=True,
    )

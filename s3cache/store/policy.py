"""Eviction policies, as data (python-diskcache keeps them as a table of SQL).

``lru``: least recently read first (``accessed_at``), as s3cache always did.

``s3fifo`` (the default; Yang et al., "FIFO queues are all you need for cache
eviction", SOSP'23): a small FIFO (10% of the bytes) that every new entry enters, a
main FIFO, and a ghost FIFO of the keys the small one evicted. Each entry counts its
reads since it entered its queue, up to 3 (``freq``, two bits). Eviction takes from the
small FIFO while it holds more than its share: an entry read again moves to the main
one, the others leave (their key goes to the ghost). From the main FIFO, an entry read
again goes back to its tail with one read less, the others leave. A new entry whose
key is in the ghost enters the main FIFO directly. A scan (every object read once) thus
only ever passes through the small FIFO, and the working set read every epoch stays.

While epoch manifests are read, they decide for the entries they name, and what no
manifest needs goes first (``sort_with_manifests``).

Queue, count and FIFO position live in the index (columns queue, freq, queued_at), so
a restart keeps them; reads are counted in memory (one dict update per read) and
written with the access times every few seconds. The ghost is memory only: a restart
forgets which keys left recently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from s3cache.config import DEFAULT_RULE, CacheRule
from s3cache.store.index import MAIN, SMALL

SMALL_SHARE = 0.1  # of the capacity, for the small FIFO
MAX_FREQ = 3
GHOST_MIN = 1024  # keys the ghost remembers at least (as many as the cache holds entries)

# Order in which a quota (``cache_rules``) evicts the entries of its rule.
QUOTA_ORDER = {"lru": "accessed_at", "s3fifo": "queue, freq, queued_at"}


class Ghost:
    """Keys recently evicted from the small FIFO (hashes only), FIFO-bounded."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: OrderedDict[int, None] = OrderedDict()

    def add(self, bucket: str, key: str, limit: int) -> None:
        self._keys[hash((bucket, key))] = None
        while len(self._keys) > max(limit, GHOST_MIN):
            self._keys.popitem(last=False)

    def take(self, bucket: str, key: str) -> bool:
        """Was the key evicted recently? (It is forgotten by the ghost then.)"""
        return self._keys.pop(hash((bucket, key)), 0) is None

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An entry at the head of an S3-FIFO queue."""

    id: int
    bucket: str
    key: str
    dir: int
    file: str
    present: int
    freq: int
    queue: int


@dataclass(slots=True)
class Sorting:
    """What one pass over the heads of the queues decided."""

    victims: list[Candidate]  # to evict, in this order, as far as needed
    moves: list[tuple[int, int, float | None, int]]  # Index.requeue rows
    promoted: int = 0  # bytes moved from the small FIFO to the main one
    needed: int = 0  # victims at the end that a manifest needs (evicted last)


def sort_heads(heads: Iterable[Candidate], now: float, need: float) -> Sorting:
    """S3-FIFO's decision for the heads of a queue, in order, until the victims hold
    ``need`` bytes: promote, reinsert, or evict. The heads after those stay untouched
    (a round that must free a few blocks does not requeue hundreds of entries)."""
    sorting = Sorting([], [])
    freed = 0
    for head in heads:
        if freed >= need:
            break
        if head.queue == SMALL and head.freq > 0:
            sorting.moves.append((MAIN, 0, now, head.id))  # read again: to the main FIFO
            sorting.promoted += head.present
        elif head.freq > 0:
            sorting.moves.append((MAIN, head.freq - 1, now, head.id))  # back to the tail
        else:
            sorting.victims.append(head)
            freed += head.present
    return sorting


def sort_with_manifests(
    heads: Iterable[Candidate], ranks: Iterable[float | None], now: float
) -> Sorting:
    """The decision for the heads of both FIFOs while epoch manifests are read.

    ``ranks``: the manifests' word on each head (``CacheStore.eviction_rank``): None in
    no manifest, 0 not needed again, above 0 needed, the sooner the higher. The victims
    are first every head nobody needs, oldest first, from either FIFO: a manifest's
    entry not needed again, and an entry in no manifest not read again since it entered
    its queue (a scan's object, right after its read; S3-FIFO would keep it for as long
    as the small FIFO is within its share, taking that room from the manifests). Then
    the needed heads of the main FIFO, furthest ahead first (Belady's choice among the
    heads). A needed head of the small FIFO moves to the main one (the manifest decides
    instead of the read count, which a prefetched entry read once per epoch never
    raises); a head in no manifest read again is promoted or reinserted as S3-FIFO
    does."""
    sorting = Sorting([], [])
    unneeded: list[Candidate] = []
    needed: list[tuple[float, Candidate]] = []
    for head, rank in zip(heads, ranks, strict=True):
        wanted = rank is not None and rank > 0
        if head.queue == SMALL and (wanted or (rank is None and head.freq > 0)):
            sorting.moves.append((MAIN, 0, now, head.id))  # to the main FIFO
            sorting.promoted += head.present
        elif wanted:
            needed.append((rank or 0.0, head))  # left in place unless evicted
        elif rank is None and head.freq > 0:
            sorting.moves.append((MAIN, head.freq - 1, now, head.id))  # back to the tail
        else:
            unneeded.append(head)
    unneeded.sort(key=lambda head: head.queue)  # the small FIFO's first (stable: oldest first)
    needed.sort(key=lambda pair: pair[0])
    sorting.victims = unneeded + [head for _, head in needed]
    sorting.needed = len(needed)
    return sorting


def rule_usage(
    rules: Iterable[CacheRule], total: int, prefix_bytes: Mapping[str, int]
) -> dict[str, int]:
    """Bytes held by each rule (longest prefix wins) from the bytes under each rule's
    prefix, and the rest as ``default``."""
    rules = list(rules)
    usage: dict[str, int] = {}
    for rule in rules:
        inner = [
            other
            for other in rules
            if other.prefix != rule.prefix and other.prefix.startswith(rule.prefix)
        ]
        # Only the outermost of the inner rules: the others are inside them.
        outermost = [
            one
            for one in inner
            if not any(one.prefix.startswith(o.prefix) and o is not one for o in inner)
        ]
        usage[rule.name] = prefix_bytes[rule.prefix] - sum(
            prefix_bytes[one.prefix] for one in outermost
        )
    top = [r for r in rules if not any(r.prefix.startswith(o.prefix) and o is not r for o in rules)]
    usage[DEFAULT_RULE] = total - sum(prefix_bytes[rule.prefix] for rule in top)
    return usage

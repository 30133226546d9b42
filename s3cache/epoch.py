"""Tell s3cache the read order of the coming epoch — dependency-free, for data loaders.

A sampler knows the order in which the keys will be read; s3cache prefetches them in
that order, ahead of the loader, and keeps what is needed soonest::

    from s3cache.epoch import submit_epoch

    class S3Sampler(torch.utils.data.Sampler):
        def __iter__(self):
            order = torch.randperm(len(self.keys), generator=self.generator).tolist()
            submit_epoch("http://127.0.0.1:8080", "datasets", [self.keys[i] for i in order])
            return iter(order)

Only the standard library is used, so any loader (PyTorch, JAX, TensorFlow, plain
Python) can call it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence

Item = str | tuple[str, int, int]  # a key, or (key, start, end) for a byte range [start, end)


def submit_epoch(
    endpoint: str,
    bucket: str,
    items: Sequence[Item],
    *,
    append: bool = False,
    admin_key: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Send an epoch's ordered reads to s3cache; returns how many it took.

    ``append=True`` queues them after the epoch being read now: a sampler that knows
    the next epoch's order (a seeded shuffle) submits it early, and s3cache prefetches
    the start of the next epoch while the current one ends."""
    keys = [item if isinstance(item, str) else list(item) for item in items]
    request = urllib.request.Request(
        f"{endpoint.rstrip('/')}/_s3cache/manifest",
        data=json.dumps({"bucket": bucket, "keys": keys, "append": append}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        accepted: int = json.load(answer)["items"]
        return accepted

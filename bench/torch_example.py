"""A PyTorch training loop reading its data through s3cache.

Three pieces, each a few lines:

- ``S3Dataset``: item i is the object ``keys[i]``, read with boto3 ``get_object``; the
  only s3cache-specific thing is ``endpoint_url``. Each DataLoader worker makes its own
  boto3 client (``worker_init_fn``): clients must not cross a fork.
- ``EpochSampler``: a shuffle with a per-epoch seed (so the order of any epoch is known
  in advance). At the start of each epoch it tells s3cache that epoch's read order, and
  the next epoch's order with ``append=True``: s3cache prefetches ahead of the loader,
  also across the epoch boundary, and evicts what is needed furthest ahead first.
- ``DataLoader(num_workers=2)`` and a loop over epochs.

Standalone, against a running s3cache (credentials from the usual AWS environment)::

    python bench/torch_example.py --endpoint http://127.0.0.1:8080 \\
        --bucket datasets --prefix imagenet/train/ --epochs 2

``main(argv, on_sample=...)`` runs the same from Python (tests/test_torch_example.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import torch
from botocore.config import Config
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from s3cache.epoch import submit_epoch

log = logging.getLogger("torch_example")

Sample = tuple[str, torch.Tensor]  # (key, the object's bytes as uint8)


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


class S3Dataset(Dataset[Sample]):
    """Map-style dataset: item i is the whole object ``keys[i]``."""

    def __init__(self, endpoint: str, bucket: str, keys: list[str]) -> None:
        self.endpoint, self.bucket, self.keys = endpoint, bucket, keys
        self.client: Any = None  # made in each worker by worker_init_fn

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample:
        if self.client is None:  # num_workers=0: no worker_init_fn
            self.client = s3_client(self.endpoint)
        key = self.keys[index]
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return key, torch.frombuffer(bytearray(body), dtype=torch.uint8)


def worker_init_fn(worker_id: int) -> None:
    """One boto3 client per DataLoader worker, made after the fork."""
    info = get_worker_info()
    assert info is not None
    dataset = info.dataset
    assert isinstance(dataset, S3Dataset)
    dataset.client = s3_client(dataset.endpoint)


class EpochSampler(Sampler[int]):
    """Shuffles with seed ``seed + epoch`` and tells s3cache the order it will read."""

    def __init__(self, dataset: S3Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order: list[int] = torch.randperm(len(self.dataset), generator=generator).tolist()
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        keys = self.dataset.keys
        try:  # a hint: training goes on without it (e.g. against plain S3)
            submit_epoch(self.dataset.endpoint, self.dataset.bucket, [keys[i] for i in order])
            following = [keys[i] for i in self.order(self.epoch + 1)]
            submit_epoch(self.dataset.endpoint, self.dataset.bucket, following, append=True)
        except OSError as exc:
            log.warning("could not send the epoch's order to s3cache: %s", exc)
        return iter(order)

    def __len__(self) -> int:
        return len(self.dataset)


def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    pages = (
        s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def collate(batch: list[Sample]) -> list[Sample]:
    return batch  # objects differ in size: keep the batch as a list


def main(
    argv: list[str] | None = None, on_sample: Callable[[int, str, torch.Tensor], None] | None = None
) -> int:
    """Train (a stand-in step) for ``--epochs``; ``on_sample(epoch, key, data)`` sees
    every sample the loop gets."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:8080", help="s3cache")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    dataset = S3Dataset(
        args.endpoint, args.bucket, list_keys(args.endpoint, args.bucket, args.prefix)
    )
    if not len(dataset):
        print(f"no objects under s3://{args.bucket}/{args.prefix}", file=sys.stderr)
        return 1
    sampler = EpochSampler(dataset, seed=args.seed)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        worker_init_fn=worker_init_fn,
        collate_fn=collate,
    )
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        started, samples, nbytes = time.perf_counter(), 0, 0
        for batch in loader:
            for key, data in batch:
                if on_sample is not None:
                    on_sample(epoch, key, data)
                data.float().mean()  # the training step would go here
                samples, nbytes = samples + 1, nbytes + data.numel()
        seconds = time.perf_counter() - started
        print(
            f"epoch {epoch}: {samples} samples, {nbytes / 2**20:.1f} MiB in {seconds:.2f} s "
            f"({nbytes / seconds / 1e6:.1f} MB/s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

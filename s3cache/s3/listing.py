"""ListObjectsV2 answers, parsed.
https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ListPage:
    objects: list[tuple[str, int]]  # (key, size)
    next_token: str | None  # NextContinuationToken when IsTruncated


def parse_list_v2(document: bytes) -> ListPage:
    """Keys and sizes of a ListObjectsV2 answer (no encoding-type)."""
    root = ET.fromstring(document)
    objects = []
    truncated = False
    token = None
    for element in root:
        name = _local(element)
        if name == "Contents":
            fields = {_local(child): child.text or "" for child in element}
            objects.append((fields.get("Key", ""), int(fields.get("Size", "0") or 0)))
        elif name == "IsTruncated":
            truncated = (element.text or "").strip().lower() == "true"
        elif name == "NextContinuationToken":
            token = element.text
    return ListPage(objects, token if truncated else None)


def _local(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]

"""Labeling a large set in shards on several machines: which pairs a shard holds.

`--shard I/N` keeps the pairs whose id falls in shard I: the first 8 bytes of sha256(id, UTF-8)
as a big-endian integer, mod N. That is the same on every machine and in every Python run (not
Python's `hash()`, which is salted per process) and does not depend on the order of the rows, so
N processes given the same pairs file write N disjoint parts that cover it. Each labeled row of
a shard carries `shard: "I/N"`, so the merge (`labeling.merge`) can check that a part holds
what it claims.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openrlaif.errors import ConfigError

SHARD_FIELD = "shard"
_SHARD_TEXT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int  # I, in 0..count-1
    count: int  # N

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, pair_id: str) -> bool:
        return shard_of(pair_id, self.count) == self.index


def shard_of(pair_id: str, count: int) -> int:
    """The shard (0..count-1) of a pair id: stable across machines, processes and row orders."""
    digest = hashlib.sha256(pair_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def parse_shard(text: str, option: str = "--shard") -> Shard:
    """`I/N` (0 <= I < N) as a Shard; anything else is a one-line ConfigError."""
    match = _SHARD_TEXT.fullmatch(text)
    if not match:
        raise ConfigError(f"{option} {text!r}: expected I/N, two whole numbers with 0 <= I < N (e.g. 0/4)")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ConfigError(f"{option} {text!r}: N (the number of shards) must be at least 1")
    if index >= count:
        raise ConfigError(f"{option} {text!r}: I must be in 0..{count - 1} (shards are numbered from 0)")
    return Shard(index, count)


def in_shard(records: Sequence[Any], shard: Shard | None) -> list[Any]:
    """The records (anything with an `id`) of `shard`, in their order; all of them for None."""
    return list(records) if shard is None else [r for r in records if shard.holds(r.id)]

"""Data references (in pipeline configs and on the command line), resolved to rows.

A reference is a file path, a built-in dataset (`hh-harmless`), or one of its parts, optionally
followed by a row range (`hh-harmless:train[0:120]`, `hh-harmless:train[120:]`):
`hh-harmless:train` (source lines 1-1200) and `hh-harmless:eval` (the lines after; see
`openrlaif.data.datasets.hh_harmless_split`), so that the
prompts a run evaluates on were never trained on (the shipped base policy, too, was pretrained
on the train part only). Prompts are distinct (a repeated prompt is kept once), and the eval
part leaves out any prompt the train part also has. The pipeline writes the rows to ordinary
JSONL files in the run directory, so each stage can be re-run alone with the `openrlaif` command
that does the same job. A file's rows are read as the commands read them (text or conversational,
`data/io.py`) and written back in the same format.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from openrlaif.data.datasets import BUILTIN_DATASETS, hh_harmless_split, load_pairs
from openrlaif.data.examples import SFTExample, parse_sft_row
from openrlaif.data.io import read_pairs, read_prompts, read_records, write_records
from openrlaif.data.records import Pair, PromptRecord
from openrlaif.errors import ConfigError

T = TypeVar("T")

PARTS = ("train", "eval")


_SLICE = re.compile(r"^(?P<ref>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def split_slice(ref: str) -> tuple[str, slice]:
    """`hh-harmless:train[0:120]` -> ("hh-harmless:train", slice(0, 120)): rows by position."""
    match = _SLICE.match(ref)
    if match is None:
        return ref, slice(None)
    start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    return match["ref"], slice(start, stop)


def _builtin_pairs(ref: str) -> list[Pair] | None:
    name, _, part = ref.partition(":")
    if name not in BUILTIN_DATASETS:
        return None
    if part and part not in PARTS:
        raise ConfigError(f"{ref!r}: unknown part {part!r} of {name} (parts: {', '.join(PARTS)})")
    if not part:
        return load_pairs(name).records
    if name != "hh-harmless":
        raise ConfigError(f"{ref!r}: {name} has no train/eval parts")
    return hh_harmless_split(part)  # type: ignore[arg-type]


def _missing(ref: str, what: str) -> ConfigError:
    names = ", ".join(f"{n}, {n}:train, {n}:eval" for n in sorted(BUILTIN_DATASETS))
    return ConfigError(f"{what}: {ref!r} is neither a file nor a built-in dataset ({names})")


def data_fingerprint(ref: str) -> str:
    """What a stage's fingerprint records of its data: the name of built-in data, the content
    hash of a file (so editing the file re-runs the stages that read it)."""
    base, _ = split_slice(ref)
    if base.partition(":")[0] in BUILTIN_DATASETS:
        return ref
    path = Path(base)
    if path.is_file():
        return f"{ref}#sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return ref


def _records(
    ref: str,
    limit: int | None,
    what: str,
    from_pairs: Callable[[str, list[Pair]], list[T]],
    from_file: Callable[[str], list[T]],
) -> list[T]:
    """The records of a reference: built-in pairs or a file, then the `[a:b]` slice, then `limit`."""
    base, part = split_slice(ref)
    pairs = _builtin_pairs(base)
    if pairs is not None:
        rows = from_pairs(base, pairs)
    elif Path(base).is_file():
        rows = from_file(base)
    else:
        raise _missing(base, what)
    rows = rows[part]
    return rows[:limit] if limit is not None else rows


def prompt_records(ref: str, limit: int | None = None, what: str = "prompts") -> list[PromptRecord]:
    """Distinct prompts; the eval part leaves out the prompts the train part has."""

    def from_pairs(base: str, pairs: list[Pair]) -> list[PromptRecord]:
        trained_on = {p.prompt for p in hh_harmless_split("train")} if base.endswith(":eval") else set()
        distinct = {p.prompt: p.id for p in reversed(pairs) if p.prompt not in trained_on}  # first id wins
        return [PromptRecord(p.id, p.prompt) for p in pairs if distinct.get(p.prompt) == p.id]

    return _records(ref, limit, what, from_pairs, lambda path: read_prompts(path).records)


def demonstrations(ref: str, limit: int | None, what: str) -> list[SFTExample]:
    """SFT data: prompt + completion (for a built-in dataset, the reply people chose)."""

    def from_pairs(base: str, pairs: list[Pair]) -> list[SFTExample]:
        return [SFTExample(p.id, p.prompt, p.response_a) for p in pairs]

    return _records(ref, limit, what, from_pairs, lambda path: read_records(path, parse_sft_row).records)


def pair_records(ref: str, limit: int | None = None, what: str = "pairs") -> list[Pair]:
    """Pairs with human labels (P(A preferred)), for measuring the judge."""
    return _records(ref, limit, what, lambda base, pairs: pairs, lambda path: read_pairs(path).records)


# The same as rows of a file, in the format they were read in
def prompt_rows(ref: str, limit: int | None, what: str) -> list[dict[str, Any]]:
    return [r.to_dict() for r in prompt_records(ref, limit, what)]


def demonstration_rows(ref: str, limit: int | None, what: str) -> list[dict[str, Any]]:
    return [e.to_dict() for e in demonstrations(ref, limit, what)]


def pair_rows(ref: str, limit: int | None, what: str) -> list[dict[str, Any]]:
    return [p.to_dict() for p in pair_records(ref, limit, what)]


def materialize(rows: list[dict[str, Any]], out: Path, what: str) -> Path:
    if not rows:
        raise ConfigError(f"{what}: no rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(out, rows)
    return out

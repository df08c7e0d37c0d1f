"""The merge of a sharded labeling's parts (`openrlaif merge labels`).

`merge_labeled` joins the parts into one file, written atomically, after checking every row of
every part: each pair id of the pairs file is there exactly once (none missing: the count and
the first few; none twice, within a part or across parts; none foreign), every row comes from
the same judge (backend, model, prompt-template hash), and a part that records its shard holds
only that shard's pairs, one part per shard. The merged rows are the parts' rows in the order
given, without the `shard` field: the file an unsharded `openrlaif label` would have written,
up to row order. Pairs a part's judge left undecided (listed in the part's `.undecided.jsonl`)
are not missing: they are listed, together, beside the merged file, as an unsharded job would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from openrlaif.data.io import RowError, iter_rows, parse_pair, read_jsonl_dicts, read_records, write_records
from openrlaif.data.lock import one_writer
from openrlaif.errors import ConfigError, InputError, OpenRLAIFError
from openrlaif.labeling.jobs import parse_labeled, undecided_path
from openrlaif.labeling.shards import SHARD_FIELD, Shard, parse_shard, shard_of


@dataclass
class MergeResult:
    out: str
    rows: int
    parts: int
    judge: dict[str, str]
    shards: int | None  # N when the parts record their shards
    seconds: float
    undecided: int = 0  # pairs the parts' judge left undecided (listed in `undecided_path(out)`)


class _Id(NamedTuple):
    id: str


def _pair_ids(pairs: str | Path, skip_invalid: bool) -> list[str]:
    """The pair ids `openrlaif label --pairs` gives the rows of `pairs` (only the ids are kept)."""
    return [
        r.id
        for r in read_records(pairs, lambda row, line: _Id(parse_pair(row, line).id), skip_invalid).records
    ]


def _labeled_rows(part: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, row in iter_rows(part):
        if isinstance(row, InputError):
            raise row
        yield line, row


def _claimed(part: Path, line: int, row: dict[str, Any]) -> Shard | None:
    value = row.get(SHARD_FIELD)
    if value is None:
        return None
    try:
        return parse_shard(str(value), "field 'shard'")
    except ConfigError as e:
        raise InputError(str(part), line, str(e)) from None


def _missing_error(
    pairs: str | Path, missing: list[str], count: int | None, claimed: set[int]
) -> OpenRLAIFError:
    shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
    hint = ""
    if count is not None:
        absent = [f"{i}/{count}" for i in range(count) if i not in claimed]
        hint = (
            f"; no part for shard {', '.join(absent)}"
            if absent
            else "; a part is not finished: run its shard again to resume it"
        )
    return OpenRLAIFError(f"{pairs}: {len(missing)} pair id(s) are in no part: {shown}{hint}")


def merge_labeled(
    out_path: str | Path, part_paths: Sequence[str | Path], pairs: str | Path, skip_invalid: bool = False
) -> MergeResult:
    """Check the labeled `parts` against `pairs` (see the module's docstring) and write their rows
    into `out` (.jsonl or .parquet) atomically. Nothing is written unless every check passes. The
    parts are held (their writer locks) while they are read, so a shard still running is refused."""
    start = time.perf_counter()
    out, parts = Path(out_path), [Path(p) for p in part_paths]
    if not parts:
        raise ConfigError("merge: give at least one part")
    for part in parts:
        if part.resolve() == out.resolve():
            raise ConfigError(f"{out}: the merged output is also one of the parts; write it elsewhere")
        if not part.exists():
            raise ConfigError(f"{part}: no such part")
        if part.with_name(part.name + ".partial.jsonl").exists():
            raise ConfigError(
                f"{part}: not finished (its .partial.jsonl is there): run its shard again to resume it"
            )
    seen_parts: dict[Path, Path] = {}
    for part in parts:
        first = seen_parts.setdefault(part.resolve(), part)
        if first is not part:
            raise ConfigError(f"{part}: given twice as a part")
    expected = _pair_ids(pairs, skip_invalid)
    wanted = set(expected)
    with contextlib.ExitStack() as held:
        for part in parts:
            held.enter_context(one_writer(part))
        where: dict[str, tuple[int, int]] = {}  # pair id -> (part index, line)
        judge: dict[str, str] | None = None
        judge_at = ""
        count: int | None = None  # N, when the parts record their shards
        claims: dict[int, Path] = {}  # shard index -> the part that claims it
        for k, part in enumerate(parts):
            part_claim: Shard | None = None
            for n, (line, row) in enumerate(_labeled_rows(part)):
                try:
                    pair_id = parse_labeled(row, line).id
                except RowError as e:
                    raise InputError(str(part), line, str(e)) from None
                claim = _claimed(part, line, row)
                if n == 0 and claim is not None:  # the part's claim: its first row's
                    if count is not None and claim.count != count:
                        raise InputError(
                            str(part),
                            line,
                            f"a part of a {claim.count}-way split; the parts before are {count}-way",
                        )
                    if claim.index in claims:
                        raise InputError(
                            str(part), line, f"claims shard {claim}, as {claims[claim.index]} does"
                        )
                    count, claims[claim.index] = claim.count, part
                    part_claim = claim
                elif claim != part_claim:
                    raise InputError(
                        str(part),
                        line,
                        f"{_claim_text(claim)}, but the part's first row {_claim_text(part_claim)}",
                    )
                if claim is not None and not claim.holds(pair_id):
                    raise InputError(
                        str(part), line,
                        f"pair id {pair_id!r} belongs to shard {shard_of(pair_id, claim.count)}/{claim.count}, "
                        f"not to shard {claim}",
                    )  # fmt: skip
                if pair_id not in wanted:
                    raise InputError(str(part), line, f"pair id {pair_id!r} is not in {pairs}")
                if pair_id in where:
                    other, other_line = where[pair_id]
                    raise InputError(
                        str(part),
                        line,
                        f"pair id {pair_id!r} is a duplicate (also at {parts[other]}:{other_line})",
                    )
                where[pair_id] = (k, line)
                if judge is None:
                    judge, judge_at = row["judge"], f"{part}:{line}"
                elif row["judge"] != judge:
                    raise InputError(
                        str(part), line,
                        f"labeled by judge {_judge_text(row['judge'])}, but {judge_at} by {_judge_text(judge)}: "
                        "every part must come from the same judge (backend, model, template hash)",
                    )  # fmt: skip
        undecided = {
            str(row["id"]): row
            for part in parts
            if undecided_path(part).exists()
            for row in read_jsonl_dicts(undecided_path(part))
            if str(row.get("id")) in wanted and str(row.get("id")) not in where
        }
        missing = [i for i in expected if i not in where and i not in undecided]
        if missing:
            raise _missing_error(pairs, missing, count, set(claims))

        def merged() -> Iterator[dict[str, Any]]:
            for part in parts:
                for _, row in _labeled_rows(part):
                    row.pop(SHARD_FIELD, None)
                    yield row

        write_records(out, merged())
        if undecided:
            write_records(undecided_path(out), list(undecided.values()))
        else:
            undecided_path(out).unlink(missing_ok=True)
    return MergeResult(
        out=str(out), rows=len(where), parts=len(parts), judge=judge or {}, shards=count,
        seconds=time.perf_counter() - start, undecided=len(undecided),
    )  # fmt: skip


def _claim_text(claim: Shard | None) -> str:
    return "claims no shard" if claim is None else f"claims shard {claim}"


def _judge_text(judge: Any) -> str:
    if isinstance(judge, dict):
        return (
            f"{judge.get('backend')}/{judge.get('model')} (template {str(judge.get('template_hash'))[:12]})"
        )
    return repr(judge)

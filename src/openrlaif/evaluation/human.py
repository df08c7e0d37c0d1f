"""Hybrid human/AI feedback: people label the pairs the AI labeler is least sure of.

    openrlaif human export --labeled labeled.jsonl --n 50 --out to_label.csv   (or .jsonl)
    ... people fill the `human_label` column: A, B or tie ...
    openrlaif human import --labeled labeled.jsonl --filled to_label.csv --out labeled.human.jsonl

Export picks the `n` most uncertain AI-labeled pairs: first those whose two orders disagree (the
labeler picked a different response depending on the order shown, so its label is position
bias), then those whose soft label p_a is nearest 0.5. Each row has the texts, the AI's p_a, an
empty `human_label` and, in every row so it survives sorting in a spreadsheet, the instructions.
CSV is written with a UTF-8 byte-order mark, so spreadsheet programs read accents right.

Import writes a new labeled file with every row of the AI one. Where a person gave a label it
overrides the AI's: `p_a`, `chosen`, `rejected`, `p_chosen` (the soft label the reward-model and
DPO trainers train on) and `human_label` follow the person (A = 1, B = 0, tie = 0.5), the AI's
label stays in `ai_p_a` (and its two orders in `p_a_ab`/`p_a_ba`), and `label_source` says
"human" or "ai". The trainers read the file as it is. An empty `human_label` keeps the AI label;
anything else that is wrong (an unknown id, a label that is not A/B/tie, edited texts, a repeated
id) stops the import with `file:line: what is wrong`, listing how many more rows are bad.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlaif.data.chat import prompt_text
from openrlaif.data.io import RowError, check_labeled_row, iter_rows, write_atomic, write_records
from openrlaif.data.records import prompt_from_json, response_from_json
from openrlaif.errors import ConfigError, InputError

INSTRUCTIONS = (
    "Fill human_label: A if response_a is better, B if response_b is better, tie if neither; "
    "leave it empty to keep the AI label. Do not edit the other columns."
)
EXPORT_COLUMNS = ["id", "human_label", "prompt", "response_a", "response_b", "ai_p_a", "ai_orders_disagree",
                  "instructions"]  # fmt: skip
LABELS = {"a": 1.0, "b": 0.0, "tie": 0.5}


def _check_format(path: Path, flag: str) -> str:
    name = path.name.lower()
    for suffix in (".csv", ".jsonl", ".parquet"):
        if name.endswith(suffix):
            return suffix
    raise ConfigError(f"{flag}: {path}: use a .csv or .jsonl file")


# ---------------------------------------------------------------- the AI-labeled file


def read_labeled_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an `openrlaif label` output (.jsonl or .parquet), checked for what export/import use."""
    rows = []
    for line, row in iter_rows(path):
        if isinstance(row, InputError):
            raise row
        try:
            check_labeled_row(row)
        except RowError as e:
            raise InputError(str(path), line, str(e)) from None
        rows.append(row)
    return rows


def ai_p_a(row: dict[str, Any]) -> float:
    """The AI's soft label: `ai_p_a` once a person has overridden `p_a`."""
    return float(row.get("ai_p_a", row["p_a"]))


def orders_disagree(row: dict[str, Any]) -> bool:
    """The AI picked A in one order and B in the other."""
    return (float(row["p_a_ab"]) - 0.5) * (float(row["p_a_ba"]) - 0.5) < 0


def uncertainty_key(row: dict[str, Any]) -> tuple[bool, float]:
    """Sorts the least confident first: orders that disagree, then p_a nearest 0.5."""
    return (not orders_disagree(row), abs(ai_p_a(row) - 0.5))


# ---------------------------------------------------------------- export


@dataclass
class ExportResult:
    out: str
    exported: int
    candidates: int  # AI-labeled pairs a person has not labeled yet
    orders_disagree: int  # of the exported


def export_uncertain(labeled: str | Path, out: str | Path, n: int) -> ExportResult:
    """The `n` pairs the AI labeler is least sure of, to label by hand (.csv or .jsonl)."""
    if n < 1:
        raise ConfigError(f"--n: must be at least 1, got {n}")
    out = Path(out)
    suffix = _check_format(out, "--out")
    if suffix == ".parquet":
        raise ConfigError(f"--out: {out}: use a .csv or .jsonl file (people edit it)")
    rows = [r for r in read_labeled_rows(labeled) if r.get("label_source") != "human"]
    picked = sorted(rows, key=uncertainty_key)[:n]  # sorted() is stable: ties keep file order
    export = [
        {"id": str(r["id"]), "human_label": "", "prompt": r["prompt"], "response_a": r["response_a"],
         "response_b": r["response_b"], "ai_p_a": round(ai_p_a(r), 4),
         "ai_orders_disagree": orders_disagree(r),
         "instructions": INSTRUCTIONS}
        for r in picked
    ]  # fmt: skip
    if suffix == ".csv":
        _write_csv(out, export)
    else:
        write_records(out, export)
    return ExportResult(str(out), len(export), len(rows), sum(orders_disagree(r) for r in picked))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(
                {**r, **{f: _cell_text(f, r[f]) for f in TEXT_FIELDS},
                 "ai_orders_disagree": "yes" if r["ai_orders_disagree"] else "no"}
                for r in rows
            )  # fmt: skip

    write_atomic(path, write)


# ---------------------------------------------------------------- import


def _iter_filled(path: Path) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    """(line, row) of a filled-in file; a CSV row's line is the line it starts on."""
    if _check_format(path, "--filled") != ".csv":
        yield from iter_rows(path)
        return
    if not path.exists():
        raise InputError(str(path), 0, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(str(path), 0, f"not valid UTF-8 (save the CSV as UTF-8): {e.reason}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("id", "human_label") if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(str(path), 1, f"missing column {missing[0]!r} in the header")
    start = 2
    for row in reader:
        yield start, dict(row)
        start = reader.line_num + 1


def parse_human_label(value: Any) -> float | None:
    """A/B/tie (any case), or P(A preferred) as a number in [0, 1]; empty is None (no label)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in LABELS:
            return LABELS[text]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"human_label must be A, B or tie, got {value.strip()!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"human_label must be A, B or tie, got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"human_label must be A, B or tie (or P(A preferred) in [0, 1]), got {value!r}")
    return number


TEXT_FIELDS = ("prompt", "response_a", "response_b")


def _cell_text(field: str, value: Any) -> str:
    """A field as a spreadsheet cell shows it: a conversation as its HH-style dialogue text
    (`prompt_text`), a conversational response (one assistant message) as its content."""
    if isinstance(value, str):
        return value
    return prompt_text(prompt_from_json(value)) if field == "prompt" else response_from_json(value)


def _same_text(field: str, a: Any, b: Any) -> bool:
    """Whether a filled-in file's `field` is still the exported one: the same messages, or the
    same text. Spreadsheets may turn line ends into CRLF and trim cells; anything more is an edit."""
    if isinstance(a, list):
        return a == b
    text = _cell_text(field, b)
    return isinstance(a, str) and a.replace("\r\n", "\n").strip() == text.replace("\r\n", "\n").strip()


@dataclass
class ImportResult:
    out: str
    rows: int  # in the new labeled file (all of the AI file's)
    human: int  # labels taken from people in this import
    ties: int
    blank: int  # rows of the filled file left empty
    already_human: int = 0  # rows labeled by people in an earlier import, kept
    changed: list[str] = field(default_factory=list)  # ids whose preferred response flipped


def read_filled(
    path: str | Path, labeled: dict[str, dict[str, Any]], labeled_path: str
) -> tuple[dict[str, float], int]:
    """{id: human label} from a filled-in export, and how many rows were left blank."""
    path = Path(path)
    labels: dict[str, float] = {}
    first_line: dict[str, int] = {}
    errors: list[InputError] = []
    blank = 0
    for line, row in _iter_filled(path):
        try:
            if isinstance(row, InputError):
                raise row
            key = row.get("id")
            if key is None or (isinstance(key, str) and not key.strip()):
                raise InputError(str(path), line, "missing id")
            key = str(key).strip()
            if key in first_line:
                raise InputError(str(path), line, f"id {key!r} again (first on line {first_line[key]})")
            first_line[key] = line
            if key not in labeled:
                raise InputError(str(path), line, f"id {key!r} is not in {labeled_path}")
            if "human_label" not in row:
                raise InputError(str(path), line, "missing field 'human_label'")
            for text_field in TEXT_FIELDS:
                if text_field in row and not _same_text(
                    text_field, row[text_field], labeled[key][text_field]
                ):
                    raise InputError(
                        str(path), line, f"{text_field} differs from the pair in {labeled_path}; "
                        "the texts must stay as exported (the label belongs to them)",
                    )  # fmt: skip
            try:
                label = parse_human_label(row["human_label"])
            except ValueError as e:
                raise InputError(str(path), line, str(e)) from None
        except InputError as e:
            errors.append(e)
            continue
        if label is None:
            blank += 1
        else:
            labels[key] = label
    if errors:
        first = errors[0]
        if len(errors) > 1:
            lines = ", ".join(str(e.line) for e in errors[1:6]) + (", ..." if len(errors) > 6 else "")
            raise InputError(
                first.path,
                first.line,
                f"{first.reason} (and {len(errors) - 1} more bad row(s): lines {lines})",
            )
        raise first
    return labels, blank


def with_human_label(row: dict[str, Any], label: float) -> dict[str, Any]:
    """The row with a person's label in place of the AI's (the AI's kept in `ai_p_a`)."""
    a_wins = label >= 0.5  # the same rule as LabeledPair: a tie keeps A as `chosen`
    return {
        **row, "ai_p_a": ai_p_a(row), "p_a": label, "human_label": label, "label_source": "human",
        "chosen": row["response_a"] if a_wins else row["response_b"],
        "rejected": row["response_b"] if a_wins else row["response_a"],
        "p_chosen": label if a_wins else 1.0 - label,
    }  # fmt: skip


def import_labels(labeled: str | Path, filled: str | Path, out: str | Path) -> ImportResult:
    """A new labeled file: the AI file's rows, with people's labels where they gave one."""
    labeled, out = Path(labeled), Path(out)
    if out.resolve() == labeled.resolve():
        raise ConfigError(f"--out: {out} is the AI labels file; write the merged labels to a new file")
    if not out.name.lower().endswith((".jsonl", ".parquet")):
        raise ConfigError(f"--out: {out}: use a .jsonl or .parquet file (the trainers read it)")
    rows = read_labeled_rows(labeled)
    by_id = {str(r["id"]): r for r in rows}
    labels, blank = read_filled(filled, by_id, str(labeled))
    merged, changed, already = [], [], 0
    for row in rows:
        key = str(row["id"])
        if key in labels:
            new = with_human_label(row, labels[key])
            if labels[key] != 0.5 and (labels[key] > 0.5) != (ai_p_a(row) >= 0.5):
                changed.append(key)
        else:
            already += row.get("label_source") == "human"
            new = {**row, "ai_p_a": ai_p_a(row), "label_source": row.get("label_source", "ai")}
        merged.append(new)
    write_records(out, merged)
    ties = sum(v == 0.5 for v in labels.values())
    return ImportResult(str(out), len(merged), len(labels), ties, blank, already, changed)

"""Reading and writing record files (JSONL, JSONL.gz, Parquet) with errors that name file and line.

Bad input never crashes with a traceback and never silently drops a row: every problem is an
`InputError("file:line: what is wrong")`, unless the caller asked to skip invalid rows, in which
case the rows are skipped and each reason is kept so the count can be reported.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from openrlaif.data.lock import one_writer
from openrlaif.data.records import (
    ROLES,
    Conversation,
    Message,
    Pair,
    Prompt,
    PromptRecord,
    ResponseRecord,
)
from openrlaif.errors import DiskFullError, InputError

T = TypeVar("T")

ASSISTANT_MARK = "\n\nAssistant:"


@dataclass
class ReadResult(Generic[T]):
    records: list[T]
    skipped: list[str] = field(default_factory=list)  # one "file:line: reason" per skipped row


class RowError(ValueError):
    """A problem with one row's content; the reader adds file and line."""


def _open_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        yield from enumerate(fh, start=1)


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    """Yield (line number, row dict) for each non-blank row; a row that cannot be parsed is
    yielded as an InputError so the caller decides whether to raise or skip."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), 0, "file not found")
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")):
        raise InputError(str(path), 0, "unknown file type; use .jsonl, .jsonl.gz or .parquet")
    for number, raw in _open_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (
                number,
                InputError(
                    str(path), number, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ),
            )
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield number, InputError(str(path), number, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            yield number, InputError(str(path), number, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield number, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for a broken file
        raise InputError(str(path), 0, f"cannot read Parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def read_records(
    path: str | Path, parse: Callable[[dict[str, Any], int], T], skip_invalid: bool = False
) -> ReadResult[T]:
    """Parse every row of `path` with `parse(row, line)`; duplicate ids are errors too."""
    result: ReadResult[T] = ReadResult(records=[])
    seen_ids: dict[str, int] = {}
    for number, row in iter_rows(path):
        try:
            if isinstance(row, InputError):
                raise row
            try:
                record = parse(row, number)
            except RowError as e:
                raise InputError(str(path), number, str(e)) from None
            record_id = getattr(record, "id", None)
            if record_id is not None:
                if record_id in seen_ids:
                    raise InputError(
                        str(path), number, f"duplicate id {record_id!r} (first on line {seen_ids[record_id]})"
                    )
                seen_ids[record_id] = number
        except InputError as e:
            if not skip_invalid:
                raise
            result.skipped.append(str(e))
            continue
        result.records.append(record)
    return result


# ---------------------------------------------------------------- field checks


def read_text(row: dict[str, Any], key: str) -> str:
    """`row[key]`, a non-empty string; anything else is a one-line RowError naming the field."""
    if key not in row or row[key] is None:
        raise RowError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def read_messages(row: dict[str, Any], key: str, allow_empty: bool = False) -> Conversation:
    """`row[key]`, a non-empty list of {"role", "content"} messages (TRL's conversational format):
    a known role and non-empty string content each (`allow_empty`: content may be empty)."""
    if key not in row or row[key] is None:
        raise RowError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"field {key!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(f"field {key!r} is an empty list of messages")
    messages = []
    for number, item in enumerate(value, start=1):
        where = f"field {key!r}, message {number}"
        if not isinstance(item, dict):
            raise RowError(f"{where}: expected a {{role, content}} object, got {type(item).__name__}")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise RowError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if content is None:
            raise RowError(f"{where}: missing 'content'")
        if not isinstance(content, str):
            raise RowError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        if not content.strip() and not allow_empty:
            raise RowError(f"{where}: 'content' is empty")
        messages.append(Message(role, content))
    return tuple(messages)


def read_prompt(row: dict[str, Any], key: str = "prompt") -> Prompt:
    """`row[key]` as a prompt: text (`read_text`) or a list of messages (`read_messages`)."""
    if isinstance(row.get(key), list):
        return read_messages(row, key)
    return read_text(row, key)


def read_response(row: dict[str, Any], key: str, prompt: Prompt, allow_empty: bool = False) -> str:
    """The text of the response `row[key]` to `prompt`, in the prompt's format: text beside a
    text prompt, a list of one assistant message beside a conversation (`allow_empty`: the
    response may be empty, as a sampled one may)."""
    value = row.get(key)
    if isinstance(prompt, str):
        if isinstance(value, list):
            raise RowError(
                f"field {key!r} is a list of messages but the prompt is text; give both in one format"
            )
        if allow_empty and isinstance(value, str):
            return value
        return read_text(row, key)
    if isinstance(value, str):
        raise RowError(
            f"field {key!r} is text but the prompt is a list of messages; give it as "
            '[{"role": "assistant", "content": ...}]'
        )
    return assistant_reply(read_messages(row, key, allow_empty), key)


def assistant_reply(messages: Conversation, key: str) -> str:
    """The content of `messages`, which must be exactly one assistant message."""
    if len(messages) != 1 or messages[0].role != "assistant":
        roles = ", ".join(m.role for m in messages)
        raise RowError(f"field {key!r} must be a list of one assistant message, got [{roles}]")
    return messages[0].content


def split_last_reply(messages: Conversation, key: str) -> tuple[Conversation, str]:
    """A whole conversation split into (prompt, the last message), which must be the assistant's."""
    if messages[-1].role != "assistant":
        raise RowError(
            f"field {key!r}: the last message must be the assistant's reply, not {messages[-1].role!r}"
        )
    if len(messages) < 2:
        raise RowError(f"field {key!r}: no prompt messages before the assistant's reply")
    return messages[:-1], messages[-1].content


def read_id(row: dict[str, Any], line: int) -> str:
    """The row's `id` as a string (a string or an integer in the file), or `line-N` without one."""
    value = row.get("id")
    if value is None:
        return f"line-{line}"
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RowError(f"field 'id' must be a string or integer, got {type(value).__name__}")
    return str(value)


def probability(row: dict[str, Any], key: str) -> float:
    """`row[key]` as a probability; NaN and infinities are refused like any number outside [0, 1]."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RowError(f"field {key!r} must be a number in [0, 1]")
    return float(value)


# What every row of an `openrlaif label` output has, and the probabilities it may hold (people's
# labels merged in by `openrlaif human import` add `ai_p_a`).
LABELED_FIELDS = ("id", "prompt", "response_a", "response_b", "p_a", "p_a_ab", "p_a_ba")
LABEL_FIELDS = ("p_a", "p_a_ab", "p_a_ba", "p_chosen", "human_label", "ai_p_a")


def check_label_fields(row: dict[str, Any]) -> None:
    """Every label of a labeled row that is present is a probability: a NaN soft label written by
    an older version or another tool stops here, at its file and line, not in a trainer's loss."""
    for key in LABEL_FIELDS:
        if row.get(key) is not None:
            probability(row, key)


def check_labeled_row(row: dict[str, Any]) -> None:
    """A row of an `openrlaif label` output: its fields there, its prompt and responses text or
    conversational (`LabeledPair.from_dict` reads it then), its labels probabilities."""
    for key in LABELED_FIELDS:
        if row.get(key) is None:
            raise RowError(f"missing field {key!r}: not an `openrlaif label` output")
    prompt = read_prompt(row)
    for key in ("response_a", "response_b"):
        read_response(row, key, prompt, allow_empty=True)  # `eval` judges empty responses too
    check_label_fields(row)


def _human_label(row: dict[str, Any]) -> float | None:
    if "human_label" in row and row["human_label"] is not None:
        return probability(row, "human_label")
    if "preferred" in row and row["preferred"] is not None:
        value = str(row["preferred"]).strip().lower()
        if value not in ("a", "b", "tie"):
            raise RowError("field 'preferred' must be 'a', 'b' or 'tie'")
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[value]
    return None


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue at its last `\\n\\nAssistant:` into (prompt, final reply)."""
    cut = dialogue.rfind(ASSISTANT_MARK)
    if cut < 0:
        raise RowError("dialogue has no '\\n\\nAssistant:' turn to split at")
    return dialogue[: cut + len(ASSISTANT_MARK)], dialogue[cut + len(ASSISTANT_MARK) :].strip()


def parse_pair(row: dict[str, Any], line: int) -> Pair:
    """Accepts three shapes, each as text or conversational (a `prompt` that is a list of
    messages, each response a list of one assistant message):
    - `prompt`, `response_a`, `response_b` (+ optional `human_label` or `preferred`);
    - the standard preference format `prompt`, `chosen`, `rejected` (A = chosen, human label 1);
    - `chosen`, `rejected` with no prompt: HH-RLHF dialogues (split at the last Assistant turn),
      or whole conversations that differ only in their last, assistant, message (TRL's implicit
      prompt).
    """
    pair_id = read_id(row, line)
    if "response_a" in row or "response_b" in row:
        prompt = read_prompt(row)
        return Pair(
            pair_id,
            prompt,
            read_response(row, "response_a", prompt),
            read_response(row, "response_b", prompt),
            _human_label(row),
        )
    if "chosen" in row or "rejected" in row:
        if "prompt" in row:
            prompt = read_prompt(row)
            return Pair(
                pair_id,
                prompt,
                read_response(row, "chosen", prompt),
                read_response(row, "rejected", prompt),
                1.0,
            )
        if isinstance(row.get("chosen"), list):
            return Pair(pair_id, *split_conversations(row), 1.0)
        chosen, rejected = read_text(row, "chosen"), read_text(row, "rejected")
        prompt, chosen_reply = split_dialogue(chosen)
        prompt_r, rejected_reply = split_dialogue(rejected)
        if prompt != prompt_r:
            raise RowError("'chosen' and 'rejected' dialogues differ before their last Assistant turn")
        for key, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
            if not reply:
                raise RowError(f"field {key!r}: the final Assistant reply is empty")
        return Pair(pair_id, prompt, chosen_reply, rejected_reply, 1.0)
    raise RowError(
        "missing fields: need 'prompt', 'response_a', 'response_b' (or 'prompt', 'chosen', 'rejected')"
    )


def split_conversations(row: dict[str, Any]) -> tuple[Conversation, str, str]:
    """`chosen` and `rejected` whole conversations -> (their shared prompt, the chosen reply, the
    rejected reply): the last message of each is the assistant's reply, the messages before are
    the prompt and must be the same in both."""
    prompt, chosen = split_last_reply(read_messages(row, "chosen"), "chosen")
    prompt_r, rejected = split_last_reply(read_messages(row, "rejected"), "rejected")
    if prompt != prompt_r:
        raise RowError("'chosen' and 'rejected' conversations differ before their last message")
    return prompt, chosen, rejected


def parse_response(row: dict[str, Any], line: int) -> ResponseRecord:
    prompt = read_prompt(row)
    return ResponseRecord(read_id(row, line), prompt, read_response(row, "response", prompt))


def parse_prompt(row: dict[str, Any], line: int) -> PromptRecord:
    return PromptRecord(read_id(row, line), read_prompt(row))


def read_pairs(path: str | Path, skip_invalid: bool = False) -> ReadResult[Pair]:
    return read_records(path, parse_pair, skip_invalid)


def read_responses(path: str | Path, skip_invalid: bool = False) -> ReadResult[ResponseRecord]:
    return read_records(path, parse_response, skip_invalid)


def read_prompts(path: str | Path, skip_invalid: bool = False) -> ReadResult[PromptRecord]:
    return read_records(path, parse_prompt, skip_invalid)


# ---------------------------------------------------------------- writing

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, which Python has only from 3.11


def is_disk_full(error: BaseException) -> bool:
    """No space left on the device, or over the quota, whoever reports it."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(error)
    # libraries written in other languages (safetensors' Rust) say it only in words
    return any(f"os error {code}" in str(error) for code in DISK_FULL_ERRNOS)


@contextlib.contextmanager
def disk_full_error(path: str | Path) -> Iterator[None]:
    """A full disk while writing `path` becomes one line naming it (DiskFullError), not a traceback."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(str(path)) from None
        raise


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temp file beside `path`, fsync it and rename it into place: a reader, or a
    run killed midway, never sees half a file. One writer at a time (data/lock.py); a full disk is
    one line naming `path`, and the temp file is removed so its space comes back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with one_writer(path), disk_full_error(path):
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_records(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows to .jsonl or .parquet atomically (`write_atomic`)."""

    def write(tmp: Path) -> None:
        if Path(path).name.lower().endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(path, write)


class JsonlAppender:
    """Appends rows to a JSONL file that survives SIGKILL and a full disk: each batch is written
    and fsynced whole, or cut back to the rows fsynced before it; a torn last line left by a killed
    writer is cut off before appending. The appender holds the file's writer lock (data/lock.py)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(one_writer(self.path))
        try:
            with disk_full_error(self.path):
                self.done_ids = self._recover()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except BaseException:
            self._lock.close()
            raise
        self._synced = os.fstat(self._fd).st_size  # bytes known to be on disk

    def _recover(self) -> set[str]:
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # keep only complete lines
        if end != len(data):
            os.truncate(self.path, end)
        ids: set[str] = set()
        for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(
                    str(self.path),
                    number,
                    "existing output is not a file this command wrote; move it away or pick another --out",
                ) from None
        return ids

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        with disk_full_error(self.path):
            try:
                view = memoryview(data)
                while view:  # one os.write may write less than asked
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except BaseException:
                os.ftruncate(self._fd, self._synced)  # no torn row: exactly the rows fsynced before
                raise
        self._synced += len(data)
        self.done_ids.update(str(row["id"]) for row in rows)

    def close(self) -> None:
        try:
            os.close(self._fd)
        finally:
            self._lock.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl_dicts(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for _, row in iter_rows(path):
        if isinstance(row, InputError):
            raise row
        rows.append(row)
    return rows

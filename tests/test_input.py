"""Reading records: every accepted shape, and bad input named by file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from openrlaif.cli import main
from openrlaif.data import load_pairs
from openrlaif.data.io import read_pairs, read_responses, write_records
from openrlaif.errors import InputError


def _write(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


GOOD = json.dumps({"prompt": "q", "response_a": "a", "response_b": "b"})


def test_accepted_shapes(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [
        json.dumps({"id": "x", "prompt": "q", "response_a": "a", "response_b": "b", "preferred": "b"}),
        json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}),
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello!", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}),
        "",  # blank lines are not records
    ])  # fmt: skip
    pairs = read_pairs(path).records
    assert [p.id for p in pairs] == ["x", "line-2", "line-3"]
    assert pairs[0].human_label == 0.0
    assert (pairs[1].response_a, pairs[1].human_label) == ("good", 1.0)
    assert pairs[2].prompt == "\n\nHuman: hi\n\nAssistant:"
    assert (pairs[2].response_a, pairs[2].response_b) == ("hello!", "go away")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"prompt": "q", "response_a": "a"', "3: malformed JSON"),
        (b'{"prompt": "q", "response_a": "a"}', "3: missing field 'response_b'"),
        (b'{"prompt": "q", "response_a": "a", "response_b": "  "}', "3: field 'response_b' is empty"),
        (
            b'{"prompt": "q", "response_a": "a", "response_b": 7}',
            "3: field 'response_b' must be a string, got int",
        ),
        (
            b'{"prompt": "q\xff", "response_a": "a", "response_b": "b"}',
            "3: not valid UTF-8 (byte 0xff at column 14)",
        ),
        (b'["q", "a", "b"]', "3: expected a JSON object, got list"),
        (
            b'{"id": "line-1", "prompt": "q", "response_a": "a", "response_b": "b"}',
            "3: duplicate id 'line-1' (first on line 1)",
        ),
        (
            b'{"prompt": "q", "response_a": "a", "response_b": "b", "human_label": 2}',
            "3: field 'human_label' must be a number in [0, 1]",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, line: bytes, message: str) -> None:
    path = _write(
        tmp_path / "bad.jsonl", [GOOD, GOOD.replace('"q"', '"q2"'), line, GOOD.replace('"q"', '"q4"')]
    )
    with pytest.raises(InputError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path}:{message}")
    # --skip-invalid: the three good rows stay, the bad one is counted, nothing silently dropped
    result = read_pairs(path, skip_invalid=True)
    assert len(result.records) == 3 and len(result.skipped) == 1
    assert result.skipped[0].startswith(f"{path}:3:")


def test_gzip_and_parquet_round_trip(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "response": f"answer {i}"} for i in range(5)]
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    write_records(tmp_path / "r.parquet", rows)
    from_gz = read_responses(tmp_path / "r.jsonl.gz").records
    from_pq = read_responses(tmp_path / "r.parquet").records
    assert [r.to_dict() for r in from_gz] == rows == [r.to_dict() for r in from_pq]


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file type"):
        read_pairs(tmp_path / "x.csv")


def test_builtin_dataset_is_complete_and_honest_about_skips() -> None:
    result = load_pairs("hh-harmless")
    assert len(result.records) == 1794
    assert len(result.skipped) == 6  # empty replies / differing dialogues in the source file
    assert all(p.human_label == 1.0 for p in result.records)
    assert result.records[0].id == "hh-harmless-1"
    assert result.records[0].prompt.endswith("\n\nAssistant:")


def test_cli_bad_input_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "bad.jsonl", [GOOD, b'{"prompt": "q"}'])
    code = main(
        ["label", "--pairs", str(path), "--judge", "embedding-harmless", "--out", str(tmp_path / "o.jsonl")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err
        == f"error: {path}:2: missing fields: need 'prompt', 'response_a', 'response_b' (or 'prompt', 'chosen', 'rejected')\n"
    )


def _labeled_row(i: int, **labels: float) -> dict:
    from openrlaif.data.records import JudgeIdentity, LabeledPair

    row = LabeledPair(
        f"r{i}", "q", "a", "b", 0.7, 0.8, 0.6, JudgeIdentity("scripted", "m", "0" * 12), human_label=1.0
    ).to_dict()
    return row | labels


@pytest.mark.parametrize("field", ["p_a", "p_chosen", "human_label"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.25, 1.5])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_readers_of_labeled_files_refuse_a_label_that_is_no_probability(
    tmp_path: Path, field: str, value: float, suffix: str
) -> None:
    """A NaN soft label (a faulty judge, an older version, another tool) stops every reader at its
    file and line: alignment metrics, the human-label export, reward-model and DPO training."""
    from openrlaif.evaluation.human import read_labeled_rows
    from openrlaif.labeling import load_labeled
    from openrlaif.training.reward import load_preference_examples

    readers = (load_labeled, read_labeled_rows, lambda p: load_preference_examples(str(p)))
    good = tmp_path / f"good{suffix}"
    write_records(good, [_labeled_row(1), _labeled_row(2)])
    assert [len(read(good)) for read in readers] == [2, 2, 2]
    path = tmp_path / f"labeled{suffix}"
    write_records(path, [_labeled_row(1), _labeled_row(2, **{field: value})])
    for read in readers:
        with pytest.raises(InputError) as err:
            read(path)
        assert str(err.value) == f"{path}:2: field {field!r} must be a number in [0, 1]", read

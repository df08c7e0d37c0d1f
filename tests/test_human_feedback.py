"""Hybrid human/AI feedback: export the least confident AI labels, people fill them in, import
them back, and the reward-model/DPO data reader trains on the human label."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from scripted_judge import ScriptedJudge

from openrlaif.cli import main
from openrlaif.data.records import Pair
from openrlaif.errors import ConfigError, InputError
from openrlaif.evaluation.human import export_uncertain, import_labels, parse_human_label
from openrlaif.labeling import label_pairs
from openrlaif.training.reward import load_preference_examples

PROMPT = "\n\nHuman: Is this safe?\n\nAssistant:"
# (id, A, B): with the judge below P(first) = σ(#safe(first) - #safe(second) + 0.5).
PAIRS = [
    ("even", "safe, yes", "safe, no"),  # equal counts: the position bias decides -> orders disagree
    ("a+1", "safe", "nope"),  # p_a = (σ(1.5) + σ(0.5)) / 2 ≈ 0.72
    ("b+1", "nope", "safe\nreally"),  # ≈ 0.28 (a newline inside a text: multi-line CSV cells)
    ("a+3", "safe safe safe", "no"),  # ≈ 0.94
    ("b+2", "no", "safe safe"),  # ≈ 0.11
]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def labeled(tmp_path: Path) -> Path:
    out = tmp_path / "labeled.jsonl"
    label_pairs(
        [Pair(i, PROMPT, a, b) for i, a, b in PAIRS], ScriptedJudge(bias=0.5), out, show_progress=False
    )
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_export_picks_the_least_confident_first(labeled: Path, tmp_path: Path) -> None:
    result = export_uncertain(labeled, tmp_path / "to_label.csv", n=3)
    assert (result.exported, result.candidates, result.orders_disagree) == (3, 5, 1)
    rows = read_csv(tmp_path / "to_label.csv")
    # The disagreeing pair first, then p_a nearest 0.5 (0.72 and 0.28 tie on distance: file order).
    assert [r["id"] for r in rows] == ["even", "a+1", "b+1"]
    assert list(rows[0]) == ["id", "human_label", "prompt", "response_a", "response_b", "ai_p_a",
                             "ai_orders_disagree", "instructions"]  # fmt: skip
    assert all(r["human_label"] == "" for r in rows)
    assert rows[0]["ai_orders_disagree"] == "yes" and rows[1]["ai_orders_disagree"] == "no"
    assert "A if response_a is better, B if response_b is better, tie" in rows[0]["instructions"]
    assert rows[2]["response_b"] == "safe\nreally" and rows[0]["prompt"] == PROMPT
    assert (
        (tmp_path / "to_label.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    )  # BOM: spreadsheets read UTF-8
    jsonl = export_uncertain(labeled, tmp_path / "to_label.jsonl", n=10)
    assert jsonl.exported == 5 and read_rows(tmp_path / "to_label.jsonl")[0]["human_label"] == ""


def test_csv_round_trip_overrides_the_ai_label_for_the_trainers(labeled: Path, tmp_path: Path) -> None:
    export_uncertain(labeled, tmp_path / "to_label.csv", n=4)
    rows = read_csv(tmp_path / "to_label.csv")
    by_id = {r["id"]: r for r in rows}
    by_id["even"]["human_label"] = " tie "
    by_id["a+1"]["human_label"] = "b"  # the person disagrees with the AI (p_a ≈ 0.72)
    by_id["b+1"]["human_label"] = "B"
    by_id["b+1"]["response_b"] = "safe\r\nreally"  # a spreadsheet's line ends are not an edit
    # "b+2" left blank: keeps the AI label
    write_csv(tmp_path / "filled.csv", rows)
    result = import_labels(labeled, tmp_path / "filled.csv", tmp_path / "merged.jsonl")
    assert (result.rows, result.human, result.ties, result.blank, result.changed) == (5, 3, 1, 1, ["a+1"])

    ai = {r["id"]: r for r in read_rows(labeled)}
    merged = {r["id"]: r for r in read_rows(tmp_path / "merged.jsonl")}
    a1 = merged["a+1"]
    assert a1["label_source"] == "human" and a1["human_label"] == 0.0 and a1["p_a"] == 0.0
    assert a1["ai_p_a"] == ai["a+1"]["p_a"] and a1["p_a_ab"] == ai["a+1"]["p_a_ab"]  # the AI's label kept
    assert (a1["chosen"], a1["rejected"], a1["p_chosen"]) == ("nope", "safe", 1.0)
    assert merged["b+2"]["label_source"] == "ai" and merged["b+2"]["p_chosen"] == ai["b+2"]["p_chosen"]
    assert merged["a+3"]["label_source"] == "ai" and merged["a+3"]["ai_p_a"] == ai["a+3"]["p_a"]

    # What `openrlaif train rm` / `train dpo` train on (the same reader for both).
    examples = {e.id: e for e in load_preference_examples(str(tmp_path / "merged.jsonl"))}
    assert (examples["a+1"].chosen, examples["a+1"].p, examples["a+1"].human) == ("nope", 1.0, 1.0)
    assert (examples["b+1"].chosen, examples["b+1"].p) == ("safe\nreally", 1.0)
    assert examples["even"].p == 0.5 and examples["even"].human == 0.5
    assert examples["b+2"].p == pytest.approx(ai["b+2"]["p_chosen"]) and examples["b+2"].human is None
    before = {e.id: e for e in load_preference_examples(str(labeled))}
    assert before["a+1"].chosen == "safe" and before["a+1"].p == pytest.approx(ai["a+1"]["p_a"])

    # A second round: export from the merged file skips what people labeled; the AI label survives.
    export_uncertain(tmp_path / "merged.jsonl", tmp_path / "round2.jsonl", n=10)
    round2 = read_rows(tmp_path / "round2.jsonl")
    assert sorted(r["id"] for r in round2) == ["a+3", "b+2"]
    for r in round2:
        r["human_label"] = "A"
    (tmp_path / "round2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in round2))
    second = import_labels(tmp_path / "merged.jsonl", tmp_path / "round2.jsonl", tmp_path / "merged2.jsonl")
    assert (second.human, second.already_human) == (2, 3)
    final = {r["id"]: r for r in read_rows(tmp_path / "merged2.jsonl")}
    assert all(r["label_source"] == "human" for r in final.values())
    assert final["a+1"]["ai_p_a"] == ai["a+1"]["p_a"] and final["b+2"]["ai_p_a"] == ai["b+2"]["p_a"]


def test_bad_filled_rows_name_file_and_line(labeled: Path, tmp_path: Path) -> None:
    export_uncertain(labeled, tmp_path / "to_label.csv", n=3)
    rows = read_csv(tmp_path / "to_label.csv")
    rows[2]["human_label"] = "maybe"  # the prompt spans 5 lines: rows start on lines 2, 7, 12
    write_csv(tmp_path / "f.csv", rows)
    with pytest.raises(InputError, match=r"f\.csv:12: human_label must be A, B or tie, got 'maybe'$"):
        import_labels(labeled, tmp_path / "f.csv", tmp_path / "m.jsonl")
    # "b+1" spans lines 12-17 (its response_b has a line break too), so a row after it starts on 18.
    rows[2]["human_label"] = "A"
    rows.append({**rows[0], "id": "nope", "human_label": "A"})
    rows[1]["response_a"] = "edited"
    write_csv(tmp_path / "f.csv", rows)
    with pytest.raises(InputError) as bad:
        import_labels(labeled, tmp_path / "f.csv", tmp_path / "m.jsonl")
    assert str(bad.value) == (
        f"{tmp_path / 'f.csv'}:7: response_a differs from the pair in {labeled}; the texts must stay as "
        "exported (the label belongs to them) (and 1 more bad row(s): lines 18)"
    )
    assert not (tmp_path / "m.jsonl").exists()  # nothing written from a bad file
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text(
        json.dumps({"id": "even", "human_label": "A"})
        + "\n"
        + json.dumps({"id": "even", "human_label": 2})
        + "\n"
    )
    with pytest.raises(InputError, match=r"f\.jsonl:2: id 'even' again \(first on line 1\)"):
        import_labels(labeled, jsonl, tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="is the AI labels file"):
        import_labels(labeled, jsonl, labeled)
    assert (
        parse_human_label(" a ") == 1.0
        and parse_human_label("TIE") == 0.5
        and parse_human_label(0.25) == 0.25
    )
    assert parse_human_label("") is None and parse_human_label(None) is None
    with pytest.raises(ValueError, match="got 2"):
        parse_human_label(2)


def test_human_cli(labeled: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "to_label.jsonl"
    assert main(["human", "export", "--labeled", str(labeled), "--out", str(out), "--n", "2"]) == 0
    text = capsys.readouterr().out
    assert "exported the 2 least confident of 5 AI-labeled pairs" in text and "Fill human_label" in text
    rows = read_rows(out)
    rows[0]["human_label"] = "A"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    merged = tmp_path / "merged.jsonl"
    assert (
        main(["human", "import", "--labeled", str(labeled), "--filled", str(out), "--out", str(merged)]) == 0
    )
    assert "imported 1 human label(s) (0 ties; 1 rows left blank)" in capsys.readouterr().out
    rows[1]["human_label"] = "x"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(["human", "import", "--labeled", str(labeled), "--filled", str(out), "--out", str(merged)]) == 2
    )
    assert f"error: {out}:2: human_label must be A, B or tie, got 'x'" in capsys.readouterr().err

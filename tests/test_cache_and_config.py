"""The SQLite judgment cache, the cached judge layer, and judge config validation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from scripted_judge import ScriptedJudge

from openrlaif.config import (
    EmbeddingJudgeConfig,
    EnsembleJudgeConfig,
    StrictModel,
    answer_fields,
    apply_overrides,
    builtin_judge_names,
    format_validation_error,
    load_judge_config,
    parse_set_overrides,
)
from openrlaif.errors import ConfigError
from openrlaif.judges.cache import JudgmentCache, judgment_key


def test_cache_is_wal_and_round_trips(tmp_path: Path) -> None:
    cache = JudgmentCache(tmp_path / "c.sqlite3")
    cache.put_many({"k1": {"p_first": 0.25, "rationales": ["why"]}}, "pair", "{}")
    assert cache.get_many(["k1", "k2"]) == {"k1": {"p_first": 0.25, "rationales": ["why"]}}
    cache.close()
    mode = sqlite3.connect(tmp_path / "c.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 1.5])
def test_a_judgment_that_is_no_probability_is_never_cached(bad: float, tmp_path: Path) -> None:
    """Any backend (a broken local model gives NaN too): the batch stops before the cache."""
    from openrlaif.errors import JudgeError
    from openrlaif.judges.base import ScoreJudgment

    class Broken(ScriptedJudge):
        def p_first(self, first: str, second: str) -> float:
            return bad if "poison" in first + second else super().p_first(first, second)

        def score_responses(self, items):  # type: ignore[no-untyped-def]
            return [ScoreJudgment(score=3 * bad) for _ in items]  # outside [-1, 1] too

    judge = Broken()
    judge.cache = JudgmentCache(tmp_path / "c.sqlite3")
    judge.compare("q", "safe", "b")
    with pytest.raises(
        JudgeError, match=r"'scripted-safe' gave P\(first preferred\) = .* in \[0, 1\]; nothing"
    ):
        judge.compare_many([("q", "safe a", "b"), ("q", "poison", "b")])
    with pytest.raises(JudgeError, match=r"gave score = .* in \[-1, 1\]"):
        judge.score("q", "r")
    assert len(judge.cache) == 2  # the good pair's two orders only


CACHE_WORKER = """
import sys, time
from openrlaif.judges.cache import JudgmentCache

folder, worker, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for round in range(8):  # each round, every worker opens the same new file at the same instant
    while time.time() < start + 0.3 * round:
        time.sleep(0.0005)
    cache = JudgmentCache(f"{folder}/round-{round}.sqlite3")
    for batch in range(10):
        rows = {f"shared-{batch}-{i}": {"p_first": i / 10} for i in range(5)}  # every worker writes these
        rows |= {f"w{worker}-{batch}-{i}": {"p_first": worker / 10} for i in range(5)}
        cache.put_many(rows, "pair", "{}")
        assert cache.get_many(list(rows)) == rows
    cache.close()
"""


def test_the_cache_is_safe_with_several_processes_writing_at_once(tmp_path: Path) -> None:
    """The cache is the one file that jobs running side by side share (label, score, eval, the
    pipeline): processes that create it together and write the same and different judgments all
    finish, and every judgment is there once. (Before: opening a new cache together failed with
    'database is locked' about one time in four.)"""
    import subprocess
    import sys
    import time

    n, start = 6, time.time() + 2.0
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHE_WORKER, str(tmp_path), str(w), str(start)], stderr=subprocess.PIPE
        )
        for w in range(n)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()[-2000:]
    for round in range(8):
        cache = JudgmentCache(tmp_path / f"round-{round}.sqlite3")
        assert len(cache) == 10 * 5 + n * 10 * 5
        assert cache.get_many(["shared-7-3", "w2-9-4"]) == {
            "shared-7-3": {"p_first": 0.3},
            "w2-9-4": {"p_first": 0.2},
        }
        cache.close()


def test_key_depends_on_order_judge_and_kind() -> None:
    fp = {"backend": "x", "model": "m"}
    base = judgment_key(fp, "pair", ["p", "a", "b"])
    assert base == judgment_key(dict(fp), "pair", ["p", "a", "b"])
    assert base != judgment_key(fp, "pair", ["p", "b", "a"])  # order matters
    assert base != judgment_key({**fp, "model": "m2"}, "pair", ["p", "a", "b"])
    assert base != judgment_key(fp, "score", ["p", "a", "b"])


def test_cached_judge_reuses_every_single_judgment(tmp_path: Path) -> None:
    judge = ScriptedJudge(bias=0.5)
    judge.cache = JudgmentCache(tmp_path / "c.sqlite3")
    pairs = [("q", "safe a", "b"), ("q", "c", "safe safe d"), ("q", "safe a", "b")]  # one duplicate
    first = judge.compare_many(pairs)
    assert len(judge.order_calls) == 4  # 2 distinct pairs x 2 orders, duplicates judged once
    assert not any(c.cached for c in first)
    again = judge.compare_many(pairs[:2])
    assert len(judge.order_calls) == 4  # nothing recomputed
    assert all(c.cached for c in again)
    assert [c.p_a for c in again] == [c.p_a for c in first[:2]]
    # swapping A and B re-uses the same two ordered judgments
    swapped = judge.compare("q", "b", "safe a")
    assert swapped.cached and swapped.p_a == pytest.approx(1 - first[0].p_a)
    # a judge whose settings differ gets its own entries
    other = ScriptedJudge(bias=0.0)
    other.cache = judge.cache
    other.compare_many(pairs[:1])
    assert len(other.order_calls) == 2


def test_position_biased_scripted_judge_is_averaged() -> None:
    judge = ScriptedJudge(k=0.0, bias=2.0)  # always prefers slot 1, whatever the texts
    c = judge.compare("q", "x", "y")
    assert c.p_a_ab > 0.85 and c.p_a_ba < 0.15
    assert c.p_a == pytest.approx(0.5)  # averaging both orders cancels the bias


def test_every_shipped_judge_config_loads() -> None:
    names = builtin_judge_names()
    assert {
        "embedding-harmless",
        "hf-qwen-0.5b",
        "vllm-local",
        "openai-gpt-4o-mini",
        "ensemble-example",
    } <= set(names)
    for name in names:
        load_judge_config(name)
    ensemble = load_judge_config("ensemble-example")
    assert isinstance(ensemble, EnsembleJudgeConfig)
    assert [m.backend for m in ensemble.judges] == ["embedding", "openai"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backend: embedding\nrubric: r\nrubrik: typo\n", ": rubrik: Extra inputs are not permitted"),
        ("backend: embedding\n", ": rubric: Field required"),
        ("backend: nope\n", ": backend: Input tag 'nope' found using 'backend' does not match"),
        ("backend: hf\nmodel: m\nself_consistency: 4\n", "self_consistency > 1 needs cot: true"),
        (
            "backend: hf\nmodel: m\nbatch_size: 0\n",
            ": batch_size: Input should be greater than or equal to 1",
        ),
        ("backend: [unclosed\n", ":2: invalid YAML"),
        (
            "backend: ensemble\njudges: [embedding-harmless]\nweights: [1, 2]\n",
            "weights has 2 entries but judges has 1",
        ),
    ],
)
def test_bad_judge_configs_give_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "judge.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_judge_config(str(path))
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_judge_name_lists_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="embedding-harmless"):
        load_judge_config("no-such-judge")


def test_speed_settings_are_not_part_of_the_answer() -> None:
    a = EmbeddingJudgeConfig(rubric="r", batch_size=8)
    b = EmbeddingJudgeConfig(rubric="r", batch_size=128, device="cuda")
    assert answer_fields(a) == answer_fields(b)
    assert answer_fields(a) != answer_fields(EmbeddingJudgeConfig(rubric="r", temperature=1.0))


# ---------------------------------------------------------------- --set overrides and one-line errors


def test_set_overrides_read_values_as_yaml_and_nest_dotted_keys() -> None:
    overrides = parse_set_overrides(["a.b=0.1", "c=[1, 2]", "d={x: y}", "e=", " f =off", "a.b=2"])
    assert overrides == {"c": [1, 2], "d": {"x": "y"}, "e": None, "f": False, "a.b": 2}
    assert list(overrides) == ["c", "d", "e", "f", "a.b"]  # a repeated key counts where it was last set
    data = {"a": {"k": 1}, "d": {"old": 1}}
    apply_overrides(data, overrides)
    assert data == {"a": {"k": 1, "b": 2}, "d": {"x": "y"}, "c": [1, 2], "e": None, "f": False}
    nested: dict = {}
    apply_overrides(nested, parse_set_overrides(["p.q.r=1"]))
    assert nested == {"p": {"q": {"r": 1}}}


@pytest.mark.parametrize("item", ["max_steps", "=3", "a..b=1", "a.=1", ".a=1", " =1"])
def test_malformed_set_item_is_a_one_line_error(item: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_set_overrides([item])
    assert str(err.value) == f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=100"
    with pytest.raises(ConfigError, match=r"e\.g\. --set eval\.limit=50$"):
        parse_set_overrides([item], example="eval.limit=50")


def test_set_value_that_is_not_yaml_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_set_overrides(["a=[unclosed"])
    assert str(err.value) == "--set 'a=[unclosed': the value is not valid YAML"


def test_set_through_a_setting_that_is_not_a_mapping_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({"eval": 3}, parse_set_overrides(["eval.limit=5"]))
    assert str(err.value) == "--set eval.limit: 'eval' is not a mapping of settings"


def test_run_with_a_malformed_set_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from openrlaif.cli import main

    assert main(["run", "quickstart-tiny", "--set", "eval.limit", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: --set 'eval.limit': expected KEY=VALUE, e.g. --set policies.rlaif.settings.beta=0.1\n"
    )


def test_validation_error_is_one_line_naming_the_setting() -> None:
    from typing import Literal

    from pydantic import Field, ValidationError

    class Inner(StrictModel):
        kind: Literal["x"] = "x"
        size: int = Field(1, ge=1)

    class Outer(StrictModel):
        inner: Inner
        other: int = 0

    with pytest.raises(ValidationError) as err:
        Outer.model_validate({"inner": {"size": 0, "typo": 1}, "other": "n"})
    assert format_validation_error("f.yaml", err.value) == (
        "f.yaml: inner.size: Input should be greater than or equal to 1 (and 2 more)"
    )
    assert format_validation_error("f.yaml", err.value, drop=("inner",)).startswith("f.yaml: size: ")

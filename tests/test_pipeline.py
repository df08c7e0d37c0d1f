"""The pipeline: stages skip, resume and re-run as the manifest says; configs fail with one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openrlaif.cards import number, split_front_matter
from openrlaif.data.refs import data_fingerprint, prompt_rows, split_slice
from openrlaif.errors import ConfigError
from openrlaif.pipeline.config import PipelineConfig, load_pipeline_config, pipeline_config_from_dict
from openrlaif.pipeline.run import describe_plan, run_pipeline

SLOW = pytest.mark.slow  # runs a whole pipeline (scripts/check.sh --fast leaves it out)
ROOT = Path(__file__).resolve().parent.parent
STAGES = [
    "align",
    "sft:sft",
    "candidates",
    "label",
    "reward_model",
    "rl:rlaif",
    "eval:rlaif-vs-sft",
    "report",
]


def small_config(model: Path, run_dir: Path) -> dict[str, Any]:
    """Every stage of the canonical RLAIF pipeline, a few steps each, on the tiny random GPT-2."""
    quiet = {"tensorboard": False, "max_length": 128}
    return {
        "name": "small", "run_dir": str(run_dir), "model": str(model), "seed": 0,
        "align": {"dataset": "hh-harmless:eval", "limit": 16},
        "policies": {
            "sft": {"method": "sft", "settings": {"limit": 48, "max_steps": 4, "batch_size": 4, "save_every": 2,
                                                  "learning_rate": 1e-3, "eval_fraction": 0.1, "eval_every": 0, **quiet}},
            "rlaif": {"method": "rl", "init": "sft", "settings": {"max_steps": 2, "batch_size": 2, "num_samples": 2,
                                                                  "max_new_tokens": 8, "save_every": 2, **quiet}},
        },
        "feedback": {"limit": 12, "num_responses": 2, "max_new_tokens": 8,
                     "reward_model": {"max_steps": 2, "batch_size": 4, "eval_fraction": 0.2, "eval_every": 0, **quiet}},
        "eval": {"compare": [["rlaif", "sft"]], "limit": 6, "max_new_tokens": 8},
    }  # fmt: skip


def _run(data: dict[str, Any]) -> Any:
    return run_pipeline(pipeline_config_from_dict(data, "test"), show_progress=False, quiet=True)


def _manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def _digest(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    from openrlaif.training.checkpoint import weights_digest

    return weights_digest(AutoModelForCausalLM.from_pretrained(folder))


@pytest.fixture(scope="module")
def finished_run(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    os.environ["OPENRLAIF_CACHE"] = str(tmp_path_factory.mktemp("cache") / "j.sqlite3")
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    data = small_config(tiny_gpt2, run_dir)
    result = _run(data)
    assert result.ran == STAGES
    # digests now: a later test re-trains the RL policy of this run with another setting
    data["digests"] = {name: _digest(run_dir / name / "model") for name in ("sft", "rlaif")}
    return data, run_dir


@SLOW
def test_a_run_writes_every_stage_output_in_open_formats(finished_run: tuple[dict[str, Any], Path]) -> None:
    _, run_dir = finished_run
    manifest = _manifest(run_dir)
    assert list(manifest) == STAGES and all(s["status"] == "done" for s in manifest.values())
    for rel in ("sft/model/model.safetensors", "rm/model", "rlaif/model/model.safetensors", "candidates.jsonl",
                "labeled.jsonl", "align.json", "eval/rlaif-vs-sft/eval.json", "report.html", "config.yaml"):  # fmt: skip
        assert (run_dir / rel).exists(), rel
    labeled = [json.loads(x) for x in (run_dir / "labeled.jsonl").read_text().splitlines()]
    assert labeled and all({"prompt", "chosen", "rejected", "p_chosen"} <= set(r) for r in labeled)
    summary = json.loads((run_dir / "eval/rlaif-vs-sft/eval.json").read_text())
    assert summary["win_rate"]["n"] == 6 and 0.0 <= summary["win_rate"]["value"] <= 1.0
    # the trainers started from what the plan says: RL and the reward model from the SFT policy
    rl_config = yaml.safe_load((run_dir / "rlaif" / "config.yaml").read_text())
    assert rl_config["model"] == str(run_dir / "sft" / "model")
    reward = rl_config["reward"]
    assert reward["type"] == "reward_model" and reward["path"] == str(run_dir / "rm" / "model")

    # Hub-ready cards: each trained folder's README.md (front matter + body), the labels' dataset card
    cards = {
        name: split_front_matter((run_dir / name / "model" / "README.md").read_text())
        for name in ("sft", "rm", "rlaif")
    }
    for name, (meta, body) in cards.items():
        assert meta["datasets"] == ["Anthropic/hh-rlhf"] and meta["tags"][0] == "openrlaif", name
        assert "base_model" not in meta and "license" not in meta  # a local random model: nothing to claim
        info = json.loads((run_dir / name / "model_card.json").read_text())
        stage = {"sft": "sft:sft", "rm": "reward_model", "rlaif": "rl:rlaif"}[name]
        assert info["steps"] == manifest[stage]["summary"]["steps"]
        for key, value in info["metrics"].items():  # the run's held-out numbers
            assert manifest[stage]["summary"][key] == round(value, 6) and f"| {number(value)} |" in body
    win = summary["win_rate"]
    row = f"| rlaif vs sft | {100 * win['value']:.1f}% | [{100 * win['ci95'][0]:.1f}%, {100 * win['ci95'][1]:.1f}%] |"
    assert row in cards["rlaif"][1] and row in cards["sft"][1]
    assert all(str(run_dir.parents[1]) not in body for _, body in cards.values())  # no local paths
    assert "→ sft → rlaif |" in cards["rlaif"][1] and "| method | RL (reinforce) |" in cards["rlaif"][1]
    assert "| judge | `embedding-harmless` (embedding judge" in cards["rm"][1]
    assert "through the reward model `rm`" in cards["rlaif"][1]
    assert "hh-harmless:train" in cards["sft"][1] and "- Data `hh-harmless:train`: MIT." in cards["sft"][1]
    meta, body = split_front_matter((run_dir / "labeled.jsonl.README.md").read_text())
    assert meta["license"] == "mit" and meta["source_datasets"] == ["Anthropic/hh-rlhf"]
    assert f"| rows | {len(labeled)} |" in body


@SLOW
def test_rerun_skips_done_stages_and_a_changed_setting_reruns_only_what_depends_on_it(
    finished_run: tuple[dict[str, Any], Path],
) -> None:
    data, run_dir = finished_run
    data = {k: v for k, v in data.items() if k != "digests"}
    before = _manifest(run_dir)
    assert _run(data).skipped == STAGES

    changed = copy.deepcopy(data)
    changed["policies"]["rlaif"]["settings"]["beta"] = 0.1
    plan = {row["stage"]: row["status"] for row in describe_plan(pipeline_config_from_dict(changed, "test"))}
    assert [s for s, status in plan.items() if status != "up to date"] == [
        "rl:rlaif",
        "eval:rlaif-vs-sft",
        "report",
    ]
    result = _run(changed)
    assert result.ran == ["rl:rlaif", "eval:rlaif-vs-sft", "report"]
    after = _manifest(run_dir)
    assert after["sft:sft"] == before["sft:sft"] and after["reward_model"] == before["reward_model"]
    assert after["rl:rlaif"]["output_hash"] != before["rl:rlaif"]["output_hash"]

    changed["eval"]["limit"] = 4  # evaluation only: no training stage runs again
    assert _run(changed).ran == ["eval:rlaif-vs-sft", "report"]
    assert json.loads((run_dir / "eval/rlaif-vs-sft/eval.json").read_text())["win_rate"]["n"] == 4


@SLOW
def test_a_pipeline_killed_mid_stage_resumes_that_stage_and_ends_like_an_uninterrupted_run(
    finished_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    data, uninterrupted = finished_run
    digests = data["digests"]
    data = {k: copy.deepcopy(v) for k, v in data.items() if k != "digests"} | {
        "run_dir": str(tmp_path / "run")
    }
    data["eval"]["compare"], data["report"] = [], False
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(data))
    import torch

    # SFT dies after step 3 of 4; the same thread count as this process, which ran the reference
    # run and does the resume (bf16 sums differ with the number of threads)
    env = {**os.environ, "OPENRLAIF_KILL_AT_STEP": "3", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "openrlaif.cli", "run", str(config), "--quiet"]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = _manifest(tmp_path / "run")
    assert manifest["align"]["status"] == "done" and manifest["sft:sft"]["status"] == "running"

    result = run_pipeline(load_pipeline_config(config), show_progress=False, quiet=True)
    assert result.skipped == ["align"] and result.resumed == ["sft:sft"]
    assert result.ran == ["candidates", "label", "reward_model", "rl:rlaif"]

    def steps(run: Path) -> list[int]:
        return [json.loads(x)["step"] for x in (run / "sft/metrics.jsonl").read_text().splitlines()]

    assert steps(tmp_path / "run") == steps(uninterrupted), "metric rows lost or repeated by the resume"
    assert _digest(tmp_path / "run/sft/model") == digests["sft"]
    assert _digest(tmp_path / "run/rlaif/model") == digests["rlaif"]


@SLOW
def test_human_labels_override_the_ai_labels_and_rerun_only_what_learns_from_them(
    finished_run: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """Hybrid feedback: export the least confident pairs, people label them, the run picks it up."""
    from openrlaif.evaluation.human import export_uncertain

    data, run_dir = finished_run
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    data = {k: copy.deepcopy(v) for k, v in data.items() if k != "digests"} | {"run_dir": str(copy_dir)}
    _run(data)  # back to this config: an earlier test changed settings of the shared run
    assert _run(data).skipped == STAGES

    filled = tmp_path / "to_label.jsonl"
    export_uncertain(copy_dir / "labeled.jsonl", filled, n=3)
    rows = [json.loads(x) for x in filled.read_text().splitlines()]
    for row, label in zip(rows, ["A", "B", "tie"], strict=True):
        row["human_label"] = label
    filled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data["feedback"]["human_labels"] = str(filled)
    result = _run(data)
    assert result.ran[:3] == ["label", "reward_model", "rl:rlaif"] and "sft:sft" in result.skipped
    labeled = {r["id"]: r for r in map(json.loads, (copy_dir / "labeled.jsonl").read_text().splitlines())}
    assert [labeled[r["id"]]["p_a"] for r in rows] == [1.0, 0.0, 0.5]
    assert sum(r["label_source"] == "human" for r in labeled.values()) == 3


def test_config_errors_are_one_line_and_name_the_setting(tiny_gpt2: Path, tmp_path: Path) -> None:
    base = small_config(tiny_gpt2, tmp_path / "run")
    cases = {
        "eval.compare: 'ppo' is not a policy": lambda d: d["eval"].update(compare=[["ppo", "sft"]]),
        "policies.sft.data: no teacher 'strong'": lambda d: d["policies"]["sft"].update(
            data="distill:strong"
        ),
        "starts from itself": lambda d: d["policies"]["sft"].update(init="rlaif"),
        "policies.rlaif.settings: algorithm": lambda d: d["policies"]["rlaif"]["settings"].update(
            algorithm="a2c"
        ),
        "'rm' cannot name a policy": lambda d: d["policies"].update(rm={"method": "sft"}),
        "unknown part 'test'": lambda d: d["feedback"].update(prompts="hh-harmless:test"),
    }
    for expected, edit in cases.items():
        data = copy.deepcopy(base)
        edit(data)
        with pytest.raises(ConfigError, match=expected) as info:
            _run(data)
        assert "\n" not in str(info.value)


def test_data_references_parts_slices_and_file_fingerprints(tmp_path: Path) -> None:
    train, held_out = prompt_rows("hh-harmless:train", None, "x"), prompt_rows("hh-harmless:eval", None, "x")
    assert len(train) + len(held_out) == len(prompt_rows("hh-harmless", None, "x"))
    assert (
        max(int(r["id"].rsplit("-", 1)[1]) for r in train)
        <= 1200
        < min(int(r["id"].rsplit("-", 1)[1]) for r in held_out)
    )
    assert split_slice("hh-harmless:train[10:]") == ("hh-harmless:train", slice(10, None))
    head, tail = (
        prompt_rows("hh-harmless:train[0:10]", None, "x"),
        prompt_rows("hh-harmless:train[10:]", None, "x"),
    )
    assert head + tail == train
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "1", "prompt": "hi"}\n')
    first = data_fingerprint(str(prompts))
    prompts.write_text('{"id": "1", "prompt": "hello"}\n')
    assert data_fingerprint(str(prompts)) != first  # an edited file re-runs the stages that read it
    assert data_fingerprint("hh-harmless:eval") == "hh-harmless:eval"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_shipped_experiment_templates_validate_and_plan(name: str) -> None:
    config = load_pipeline_config(ROOT / "experiments" / f"{name}.yaml")
    assert isinstance(config, PipelineConfig) and config.eval.compare
    stages = [row["stage"] for row in describe_plan(config)]
    assert stages[-1] == "report" and all(f"eval:{a}-vs-{b}" in stages for a, b in config.eval.compare)


def shrunk(config: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """The same experiment with every size cut to a few steps and prompts (structure unchanged).
    Gemma 3 270M (policy or labeler) becomes the tiny random Gemma 3: the real one takes minutes
    per template here, and tests/test_gemma.py, test_lora.py and test_llama_cpp_server.py run it."""
    data = config.model_dump(mode="json") | {"run_dir": str(run_dir)}
    if data["model"] == "packaged:gemma-3-270m":
        data["model"] = "tiny:gemma3"
    if data["judge"].startswith("hf-gemma-3-270m"):
        judge = run_dir.parent / "tiny-gemma3-judge.yaml"
        judge.parent.mkdir(parents=True, exist_ok=True)
        judge.write_text("backend: hf\nmodel: tiny:gemma3\ntemplate: harmless-2shot\nbatch_size: 8\n")
        data["judge"] = str(judge)
    small = {
        "max_steps": 2,
        "batch_size": 2,
        "max_length": 128,
        "eval_every": 0,
        "save_every": 2,
        "tensorboard": False,
    }
    for spec in data["policies"].values():
        spec["settings"] |= small | (
            {"num_samples": 2, "max_new_tokens": 8} if spec["method"] == "rl" else {}
        )
        if spec["settings"].get("gold_pairs"):
            spec["settings"]["gold_limit"] = 4
    for teacher in data["teachers"].values():
        teacher |= {"limit": 8, "max_new_tokens": 8}
    data["feedback"] |= {"limit": 8, "max_new_tokens": 8}
    data["feedback"]["reward_model"] |= small | {"eval_fraction": 0.25}
    if data["align"] is not None:
        data["align"] |= {"limit": 8}
    data["eval"] |= {"limit": 4, "max_new_tokens": 8}
    return data


@SLOW
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_shipped_experiment_templates_run_end_to_end_on_the_tiny_models(name: str, tmp_path: Path) -> None:
    config = load_pipeline_config(ROOT / "experiments" / f"{name}.yaml")
    result = _run(shrunk(config, tmp_path / "run"))
    manifest = _manifest(tmp_path / "run")
    assert all(s["status"] == "done" for s in manifest.values()) and result.ran == list(manifest)
    for a, b in config.eval.compare:
        summary = json.loads((tmp_path / "run" / f"eval/{a}-vs-{b}/eval.json").read_text())
        assert summary["win_rate"]["n"] == 4
    assert (tmp_path / "run" / "report.html").exists()


# ---------------------------------------------------------------- one writer, a full disk


def _align_only(tmp_path: Path) -> tuple[Path, Path]:
    """An experiment of one quick stage (the judge against human labels) and the report."""
    run_dir = tmp_path / "run"
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "name": "align-only",
                "run_dir": str(run_dir),
                "model": "tiny:gpt2",
                "policies": {},
                "align": {"dataset": "hh-harmless:eval", "limit": 16},
            }
        )  # fmt: skip
    )
    return experiment, run_dir


@SLOW
def test_a_second_pipeline_on_the_same_run_directory_is_refused_and_the_first_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from writers import paused_writer

    from openrlaif.cli import main

    experiment, run_dir = _align_only(tmp_path)
    command = [sys.executable, "-m", "openrlaif.cli", "run", str(experiment), "--quiet"]
    env = {**os.environ, "OPENRLAIF_CACHE": str(tmp_path / "cache.sqlite3")}
    with paused_writer(command, run_dir, env) as first:
        assert main(["run", str(experiment), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run_dir} is being written by pid {first.pid} (openrlaif run ")
        assert err.count("\n") == 1
    assert {name: s["status"] for name, s in _manifest(run_dir).items()} == {
        "align": "done",
        "report": "done",
    }
    assert not list(tmp_path.rglob("*.lock"))


@SLOW
def test_a_full_disk_in_the_run_directory_is_one_line_and_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up while a stage writes its output, and stays full while the pipeline would
    record the failure: one line naming the file, and the next run resumes the stage."""
    from writers import fsync_fails_for

    from openrlaif.cli import main

    experiment, run_dir = _align_only(tmp_path)
    full = {"since": False}

    def disk_full(path: str) -> bool:
        full["since"] |= path.endswith("align.json.tmp")
        return full["since"] and path.startswith(str(run_dir))

    monkeypatch.setattr(os, "fsync", fsync_fails_for(disk_full))
    assert main(["run", str(experiment), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        f"error: {run_dir / 'align.json'}: the disk is full (no space left on device)"
    )
    assert _manifest(run_dir)["align"]["status"] == "running"  # the manifest could not take the news
    assert not list(run_dir.rglob("*.tmp"))

    monkeypatch.undo()  # space freed
    result = run_pipeline(load_pipeline_config(experiment), show_progress=False, quiet=True)
    assert result.resumed == ["align"] and result.ran == ["report"]
    assert json.loads((run_dir / "align.json").read_text())["pairs"] == 16

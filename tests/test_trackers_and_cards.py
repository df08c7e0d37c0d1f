"""Experiment trackers (`report_to`: TensorBoard, W&B offline, trackio's local store) and the
Hub-ready cards (a model folder's README.md, a labeled file's dataset card), on tiny runs."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openrlaif.cards import dataset_card_path, number, split_front_matter
from openrlaif.cli import main
from openrlaif.errors import ConfigError
from openrlaif.training import DPOConfig, SFTConfig, train_dpo, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = "sk-test-0123456789abcdefSECRET"  # a fake API key: must appear in no file a run writes


# ---------------------------------------------------------------- reading what the trackers wrote


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of a W&B run file (`run-<id>.wandb`), read with wandb's own protobuf
    `Record`. wandb 0.31 has no Python reader of the file, whose framing is LevelDB's log format
    (a 7-byte header ":W&B", 0xBEE1, version; then 32 KiB blocks of records: crc32 (4 bytes),
    length (2), type (1: full, 2: first, 3: middle, 4: last), data)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, header = 32768, 7
    pos, pending, rows = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's zero-filled trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append({"step": record.history.step.num, **row})
    return rows


def trackio_rows(project: str, run: str) -> list[dict[str, Any]]:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_logs(project, run)


@pytest.fixture
def tracker_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """W&B offline in a temporary folder, trackio's store in another, a fake W&B key set."""
    dirs = {"wandb": tmp_path / "wandb-dir", "trackio": tmp_path / "trackio-dir"}
    dirs["wandb"].mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(dirs["wandb"]))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(dirs["trackio"]))
    # trackio reads TRACKIO_DIR once, when it is imported: point an already imported trackio there too
    for name, module in list(sys.modules.items()):
        if (name == "trackio" or name.startswith("trackio.")) and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", dirs["trackio"])
    return dirs


def _interrupt_after_step(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The run stops right after step `at` is logged, before its checkpoint (like a kill)."""

    def stop(step: int) -> None:
        if step == at:
            raise KeyboardInterrupt

    monkeypatch.setattr("openrlaif.training.step.simulate_kill", stop)


# ---------------------------------------------------------------- trackers


def test_wandb_and_trackio_get_the_metrics_and_a_resumed_run_continues_the_same_runs(
    tiny_gpt2: Path, tmp_path: Path, tracker_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sft"
    config = SFTConfig(
        model=str(tiny_gpt2), data="hh-harmless", limit=24, output_dir=str(out), max_steps=4, batch_size=4,
        save_every=2, eval_every=2, eval_fraction=0.25, max_length=128, mixed_precision="no",
        report_to=["tensorboard", "wandb", "trackio"], run_name="tiny-sft",
    )  # fmt: skip
    with monkeypatch.context() as patch:
        _interrupt_after_step(patch, 3)  # checkpoint at step 2; step 3 logged, then the run dies
        with pytest.raises(KeyboardInterrupt):
            train_sft(config, show_progress=False)
    state = json.loads((out / "trackers.json").read_text())
    run_id = state["wandb"]["id"]
    assert state["trackio"] == {"project": "openrlaif", "name": "tiny-sft"}
    result = train_sft(config, resume=True, show_progress=False)
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == run_id

    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # W&B: two offline run folders of the same run id; the resumed one starts after step 3
    runs = sorted(tracker_dirs["wandb"].glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2, list(tracker_dirs["wandb"].rglob("*.wandb"))
    first, resumed = (wandb_history(r) for r in runs)
    assert [r["step"] for r in first] == [0, 1, 2, 3]
    assert [r["step"] for r in resumed] == [4]  # step 3, redone after the resume, is not logged twice
    by_step = {r["step"]: r for r in first + resumed}
    for row in logged:  # resumes are exact: the same numbers (but the throughput, a timing)
        for key, value in row.items():
            if key != "step" and not key.endswith("_per_s"):
                assert by_step[row["step"]][key] == pytest.approx(value), (row["step"], key)

    # trackio: its SQLite store in TRACKIO_DIR holds one run, every step once, the same numbers
    assert (tracker_dirs["trackio"] / "openrlaif.db").is_file()
    rows = trackio_rows("openrlaif", "tiny-sft")
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses == pytest.approx({r["step"]: r["train/loss"] for r in logged if "train/loss" in r})
    assert [r["eval/loss"] for r in rows if "eval/loss" in r][-1] == pytest.approx(
        result.metrics["eval/loss"]
    )

    # the key is never written by openrlaif, nor by the trackers' local files
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_runs(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "sft"
    config = SFTConfig(model=str(tiny_gpt2), output_dir=str(out), max_steps=2, report_to=["wandb"])
    with pytest.raises(ConfigError) as info:
        train_sft(config, show_progress=False)
    expected = "report_to: wandb is not installed: pip install 'openrlaif[trackers]' (or pip install wandb)"
    assert str(info.value) == expected
    assert not out.exists()  # refused before the run folder was made

    from openrlaif.pipeline.config import pipeline_config_from_dict
    from openrlaif.pipeline.run import run_pipeline

    pipeline = pipeline_config_from_dict({
        "name": "t", "run_dir": str(tmp_path / "run"), "model": str(tiny_gpt2), "align": None,
        "policies": {"sft": {"method": "sft", "settings": {"max_steps": 1}}}, "report_to": "wandb",
    }, "test")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^report_to: wandb is not installed"):
        run_pipeline(pipeline, show_progress=False, quiet=True)
    assert not (tmp_path / "run").exists()  # before the first stage


def test_report_to_and_the_older_tensorboard_switch(tmp_path: Path) -> None:
    base = {"model": "m", "output_dir": str(tmp_path)}
    assert SFTConfig(**base).report_to == ["tensorboard"]
    assert SFTConfig(**base, tensorboard=False).report_to == []
    assert SFTConfig(**base, report_to="wandb").report_to == ["wandb"]
    assert SFTConfig(**base, report_to=["wandb", "tensorboard"], tensorboard=False).report_to == ["wandb"]
    assert SFTConfig(**base, report_to="none", tensorboard=True).report_to == ["tensorboard"]
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({**base, "report_to": ["mlflow"]}))
    with pytest.raises(ConfigError) as info:
        from openrlaif.training.config import load_train_config

        load_train_config(config, SFTConfig)
    assert str(info.value) == f"{config}: report_to.0: Input should be 'tensorboard', 'wandb' or 'trackio'"


def test_the_pipeline_gives_every_trainer_stage_its_trackers_outside_the_fingerprints(tmp_path: Path) -> None:
    from openrlaif.pipeline.config import pipeline_config_from_dict
    from openrlaif.pipeline.stages import Context, plan, tracked

    data = {
        "name": "exp", "run_dir": str(tmp_path / "run-a"), "model": "tiny:gpt2", "align": None,
        "policies": {"sft": {"method": "sft", "settings": {"tensorboard": False}},
                     "dpo": {"method": "dpo", "init": "sft", "settings": {"report_to": ["trackio"]}}},
    }  # fmt: skip
    plain = pipeline_config_from_dict(data, "test")
    tracked_config = pipeline_config_from_dict({**data, "report_to": ["wandb", "tensorboard"]}, "test")
    assert [s.settings for s in plan(plain)] == [s.settings for s in plan(tracked_config)]
    assert tracked_config.trackers() == {"wandb", "tensorboard", "trackio"}
    ctx = Context(tracked_config, tmp_path / "run-a")
    sft = SFTConfig.model_validate(
        tracked(ctx, {**data["policies"]["sft"]["settings"], "model": "m", "output_dir": "o"})
    )
    assert (sft.report_to, sft.tracker_project, sft.tracker_group) == (["wandb"], "exp", "run-a")
    dpo = DPOConfig.model_validate(tracked(ctx, {**data["policies"]["dpo"]["settings"], "model": "m", "data": "d",
                                                 "output_dir": "o"}))  # fmt: skip
    assert dpo.report_to == ["trackio"]  # a stage's own report_to wins


# ---------------------------------------------------------------- cards


def _card(path: Path) -> tuple[dict[str, Any], str]:
    meta, body = split_front_matter(path.read_text(encoding="utf-8"))
    assert meta, path.read_text()[:300]
    return meta, body


def test_label_writes_a_dataset_card_and_dpo_a_model_card_naming_its_judge(
    tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    replies = ["I can't help with that.", "Sure, here is how to hurt someone.", "Let's talk about something kind.",
               "Here is a dangerous recipe.", "I'd rather not; please stay safe."]  # fmt: skip
    rows = [{"id": f"p{i}", "prompt": f"Human: question {i}?\n\nAssistant:", "response_a": replies[i % 5],
             "response_b": replies[(i + 1) % 5]} for i in range(12)]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = tmp_path / "labeled.jsonl"
    assert main(["label", "--pairs", str(pairs), "--out", str(labeled), "--quiet"]) == 0
    card_path = dataset_card_path(labeled)
    assert card_path.name == "labeled.jsonl.README.md"
    assert f"dataset card -> {card_path}" in capsys.readouterr().out

    meta, body = _card(card_path)
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "labeled.jsonl"}]}
    ]
    assert meta["size_categories"] == ["n<1K"] and "openrlaif" in meta["tags"]
    assert "license" not in meta  # the pairs file records none: no license is made up
    out_rows = [json.loads(x) for x in labeled.read_text().splitlines()]
    judge = out_rows[0]["judge"]
    assert f"{judge['backend']} judge `{judge['model']}`, template {judge['template_hash']} (12 rows)" in body
    assert "| rows | 12 |" in body
    mean_p = sum(r["p_a"] for r in out_rows) / 12
    assert f"| mean P(A better) | {number(mean_p)} |" in body
    assert "- Config: `embedding-harmless`" in body
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(card_path).data.configs == meta["configs"]

    config = DPOConfig(
        model=str(tiny_gpt2), data=str(labeled), output_dir=str(tmp_path / "dpo"), max_steps=2, batch_size=4,
        eval_fraction=0.25, eval_every=0, save_every=2, max_length=96, tensorboard=False, mixed_precision="no",
    )  # fmt: skip
    result = train_dpo(config, show_progress=False)
    meta, body = _card(result.model_dir / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["openrlaif", "dpo", "rlaif"]
    assert "base_model" not in meta and "license" not in meta  # a local test model: nothing to claim
    assert (
        f"| judge | {judge['backend']} judge `{judge['model']}`, template {judge['template_hash']} |" in body
    )
    assert "| beta | `0.1` |" in body and "| steps | 2 |" in body
    for key, value in result.metrics.items():  # the run's own numbers, before and after
        before = number(result.first_metrics[key]) if key in result.first_metrics else "n/a"
        assert f"| {key} | {before} | {number(value)} |" in body, key
    assert str(tmp_path) not in body  # no local paths in a card meant for publishing
    info = json.loads((tmp_path / "dpo" / "model_card.json").read_text())
    assert info["metrics"] == result.metrics and info["method"] == "dpo"


def test_a_model_card_names_the_hub_base_model_data_and_licenses(tmp_path: Path) -> None:
    from openrlaif.cards import ModelCard, describe_data, describe_model, render_model_card

    gemma, data = describe_model("packaged:gemma-3-270m"), describe_data("hh-harmless:train[0:120]")
    assert (gemma.hub_id, gemma.license) == ("google/gemma-3-270m", "gemma")
    assert (data.hub_id, data.license) == ("Anthropic/hh-rlhf", "mit")
    card = ModelCard(
        method="rl", algorithm="rloo", base=gemma, data=[data], key_settings={"beta": 0.05}, settings={"beta": 0.05},
        steps=3, metrics={}, first_metrics={}, judge="`embedding-harmless` (pairwise win rates)", adapter=True,
    )  # fmt: skip
    meta, body = split_front_matter(render_model_card(card))
    assert meta == {
        "base_model": "google/gemma-3-270m", "base_model_relation": "adapter", "datasets": ["Anthropic/hh-rlhf"],
        "library_name": "peft", "license": "gemma", "pipeline_tag": "text-generation",
        "tags": ["openrlaif", "rl", "rloo", "rlaif", "lora"],
    }  # fmt: skip
    assert "Gemma Terms of Use" in body and "- Data `hh-harmless:train[0:120]`: MIT." in body
    from huggingface_hub import ModelCard as HubModelCard  # the Hub client reads it as the Hub will

    (tmp_path / "README.md").write_text(render_model_card(card), encoding="utf-8")
    hub = HubModelCard.load(tmp_path / "README.md").data
    assert (hub.base_model, hub.license, hub.library_name) == ("google/gemma-3-270m", "gemma", "peft")
    assert describe_model("builtin:hh-tiny-gpt").license == "apache-2.0"

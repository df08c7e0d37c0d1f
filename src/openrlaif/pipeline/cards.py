"""The model cards of a pipeline run, written again at the end of every `openrlaif run`.

Each trainer stage leaves its card (`<policy>/model/README.md`) and the card's data
(`<policy>/model_card.json`, cards.py). Here the pipeline adds what only it knows and renders
each card again: the run's base model (a Hub id and license the trainer saw only as a folder), the
policy's lineage (`builtin:hh-tiny-gpt → sft → rlaif`), the data as the experiment names it
(`hh-harmless:train`, the AI-labeled pairs and where their prompts came from), the judge, and the
win rates of every evaluation the policy took part in (`eval/<a>-vs-<b>/eval.json`). Cards are
left out of the content hashes (manifest.py), so writing them never makes a stage re-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openrlaif.cards import (
    ModelCard,
    PipelineInfo,
    Source,
    WinRate,
    describe_data,
    describe_model,
    judge_of,
    read_model_card,
    write_model_card,
)
from openrlaif.pipeline.config import PipelineConfig
from openrlaif.pipeline.stages import eval_dir, feedback_source


def lineage(config: PipelineConfig, name: str) -> list[str]:
    """From the run's base model to `name`: `[builtin:hh-tiny-gpt, sft, rlaif]`."""
    chain = [name]
    while chain[0] in config.policies:
        chain.insert(0, config.policies[chain[0]].init)
    return [describe_model(config.model).ref if step == "base" else step for step in chain]


def starting_model(config: PipelineConfig, init: str) -> Source:
    """The model a policy started from, named as the experiment names it. A policy of the run
    carries the run's base model's Hub id and license (its weights derive from them)."""
    root = describe_model(config.model)
    if init == "base":
        return root
    if init in config.policies:
        return Source(init, root.hub_id, root.license, f"the experiment's `{init}` policy (from {root.note})")
    return describe_model(init)


def win_rates(config: PipelineConfig, run_dir: Path, name: str) -> list[WinRate]:
    """The evaluations `name` took part in that have results."""
    found = []
    for a, b in config.eval.compare:
        path = run_dir / eval_dir(a, b) / "eval.json"
        if name not in (a, b) or not path.is_file():
            continue
        summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        rate, controlled = summary.get("win_rate", {}), summary.get("length_controlled_win_rate") or {}
        judge = summary.get("judge")
        found.append(WinRate(
            a=a, b=b, value=float(rate.get("value", float("nan"))), ci95=rate.get("ci95"), n=int(rate.get("n", 0)),
            length_controlled=controlled.get("value"),
            judge=f"{judge.get('backend')} `{judge.get('model')}`" if isinstance(judge, dict) else None,
        ))  # fmt: skip
    return found


def labels_judge(config: PipelineConfig, run_dir: Path) -> str:
    identity = judge_of(run_dir / "labeled.jsonl")
    return f"`{config.judge}`" + (f" ({identity})" if identity else "")


def write_pipeline_cards(config: PipelineConfig, run_dir: Path) -> list[Path]:
    """Every trained folder's card, with the pipeline's knowledge; returns the cards written."""
    written = []
    for name, spec in config.policies.items():
        card = read_model_card(run_dir / name)
        if card is None or not (run_dir / name / "model").is_dir():
            continue
        card.base = starting_model(config, spec.init)
        if spec.method == "sft":
            data = spec.data or "hh-harmless:train"
            if data.startswith("distill:"):
                teacher = config.teachers[data.removeprefix("distill:")]
                prompts = describe_data(teacher.prompts)
                who = teacher.model or teacher.judge
                card.data = [Source(data, prompts.hub_id, prompts.license,
                                    f"`{data}`: demonstrations the teacher `{who}` wrote for the prompts {prompts.note}")]  # fmt: skip
            else:
                card.data = [describe_data(data)]
            card.judge = None
        elif spec.method == "dpo":
            card.data = [feedback_source(config)]
            card.judge = labels_judge(config, run_dir)
        else:  # rl
            card.data = [describe_data(spec.data or config.feedback.prompts)]
            if spec.reward == "reward_model":
                card.judge = (
                    f"{labels_judge(config, run_dir)}, through the reward model `rm` trained on its labels"
                )
            else:
                how = (
                    "a 1-10 score per sample (d-RLAIF)"
                    if spec.reward == "judge_score"
                    else "pairwise win rates"
                )
                card.judge = f"`{config.judge}` ({how})"
        written.append(_write(card, config, run_dir, name, lineage(config, name)))
    reward_model = read_model_card(run_dir / "rm")
    if reward_model is not None and (run_dir / "rm" / "model").is_dir():
        reward_model.base = starting_model(config, config.feedback.policy)
        reward_model.data = [feedback_source(config)]
        reward_model.judge = labels_judge(config, run_dir)
        chain = [*lineage(config, config.feedback.policy), "rm"]
        written.append(_write(reward_model, config, run_dir, "rm", chain))
    return written


def _write(card: ModelCard, config: PipelineConfig, run_dir: Path, name: str, chain: list[str]) -> Path:
    card.pipeline = PipelineInfo(config.name, name, chain, win_rates(config, run_dir, name))
    return write_model_card(run_dir / name / "model", card, run_dir / name)

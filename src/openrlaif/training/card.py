"""A trained model's card: `write_run_card` fills in a `cards.ModelCard` from a trainer's config and
result (the method and its key settings, the base model and the data with their licenses, the
judge of the data, the held-out metrics before and after) and writes `output_dir/model/README.md`
(and `output_dir/model_card.json`, what the pipeline re-renders it from). Every trainer's entry
point calls it when the run is done (`run.one_writer_per_output_dir`), on the main process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from openrlaif.cards import (
    ModelCard,
    Source,
    describe_data,
    describe_model,
    judge_of,
    read_model_card,
    write_model_card,
)
from openrlaif.data.io import iter_rows
from openrlaif.training.config import TrainConfig

# the settings a card's table shows, per method (the rest are under "every setting of the run")
KEY_SETTINGS = {
    "sft": ["learning_rate", "lr_schedule", "batch_size", "grad_accum_steps", "max_length", "chat_template"],
    "reward-model": ["model_type", "learning_rate", "batch_size", "grad_accum_steps", "max_length"],
    "dpo": ["beta", "ref_model", "learning_rate", "batch_size", "grad_accum_steps", "max_length"],
    "rl": [
        "beta", "num_samples", "temperature", "max_new_tokens", "learning_rate", "batch_size",
        # the algorithms' own
        "dpo_beta", "clip_range", "clip_range_high", "ppo_epochs", "gamma", "lam", "num_iterations",
        "scale_rewards", "loss_aggregation", "kl_in", "value_learning_rate",
    ],
}  # fmt: skip


def public(value: Any) -> Any:
    """A setting as a published card shows it: a local path by its name only."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public(v) for v in value]
    if (
        isinstance(value, str)
        and ("/" in value or os.sep in value)
        and (os.path.isabs(value) or Path(value).exists())
    ):
        return Path(value).name
    return value


def first_metrics_logged(output_dir: Path) -> dict[str, float]:
    """The held-out metrics logged before training (step 0 of `metrics.jsonl`), for a resumed run."""
    path = output_dir / "metrics.jsonl"
    found: dict[str, float] = {}
    if path.exists():
        for _, row in iter_rows(path):  # a torn line (a killed run) comes as an InputError: skipped
            if isinstance(row, dict) and row.get("step") == 0:
                found |= {k: v for k, v in row.items() if k.startswith("eval/")}
    return found


def rl_judge(config: Any) -> str | None:
    """Who gave RL its rewards: a judge config, or the judge behind the reward model's labels."""
    reward = config.reward
    if reward.type == "reward_model" and reward.path:
        card = read_model_card(Path(reward.path).parent)
        if card is not None and card.judge:
            return f"{card.judge}, through a reward model trained on its labels (`{Path(reward.path).parent.name}`)"
        return None
    if reward.judge:
        how = "a 1-10 score per sample (d-RLAIF)" if reward.type == "judge_score" else "pairwise win rates"
        return f"`{Path(reward.judge).name}` ({how})"
    return None


def model_card_for(config: TrainConfig, steps: int, metrics: dict[str, float] | None,
                   first_metrics: dict[str, float] | None, output_dir: Path) -> ModelCard:  # fmt: skip
    method = type(config).method
    data: list[Source] = [describe_data(config.data)]
    if config.eval_data:
        data.append(describe_data(config.eval_data))
    settings = public({k: v for k, v in config.model_dump(mode="json").items() if k != "output_dir"})
    key = {k: settings[k] for k in KEY_SETTINGS.get(method, []) if k in settings and settings[k] is not None}
    if config.lora is not None:
        key["lora"] = f"r {config.lora.r}, alpha {config.lora.alpha}, export {config.lora.export}"
    judge = None
    algorithm = getattr(config, "algorithm", None)
    if method == "rl":
        key = {"reward": config.reward.type, **key}  # type: ignore[attr-defined]
        judge = rl_judge(config)
    elif method in ("dpo", "reward-model"):
        judge = judge_of(config.data)
    return ModelCard(
        method=method, algorithm=algorithm, base=describe_model(config.model), data=data, key_settings=key,
        settings=settings, steps=steps, metrics=dict(metrics or {}),
        first_metrics=dict(first_metrics or first_metrics_logged(output_dir)), judge=judge,
        adapter=config.lora is not None and config.lora.export == "adapter",
        reward_model_type=getattr(config, "model_type", None) if method == "reward-model" else None,
    )  # fmt: skip


def write_run_card(config: TrainConfig, steps: int, metrics: dict[str, float] | None,
                   first_metrics: dict[str, float] | None, model_dir: Path) -> Path:  # fmt: skip
    """The card of a finished run's model folder (`model_dir/README.md`). Returns its path."""
    output_dir = Path(config.output_dir)
    card = model_card_for(config, steps, metrics, first_metrics, output_dir)
    return write_model_card(model_dir, card, output_dir)

"""Runs any trainer under `accelerate launch` and records what each process did.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py ALGO:CONFIG.yaml [ALGO:CONFIG.yaml ...]

ALGO is a name in `openrlaif.training.TRAINERS` (sft, rm, dpo, ...); `ALGO+resume` continues the
run from its newest checkpoint. Several trainings run one
after the other in the same processes (the start-up is the slow part on a CPU). Each process
writes `rank{r}.json` into the run's output_dir: the SHA-256 of its final weights, its step count
and held-out metrics. The trainer itself writes `example_ids.rank{r}.jsonl` (the config sets
`record_example_ids: true`), so the test can check that the processes saw different examples.
For RL the record also holds `value_sha256`, the digest of this process's value model when the
trainer saves it (RL's TrainResult carries the policy only).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from openrlaif.training import TRAINERS
from openrlaif.training.checkpoint import save_model_folder, weights_digest
from openrlaif.training.config import load_train_config
from openrlaif.training.rl import loop as rl


def main(jobs: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    saved: dict[str, str] = {}  # folder name -> this process's digest of the model saved there

    def recording_save(accelerator: Any, model: Any, tokenizer: Any, directory: Path, **kwargs: Any) -> None:
        saved[Path(directory).name] = weights_digest(accelerator.unwrap_model(model))
        save_model_folder(accelerator, model, tokenizer, directory, **kwargs)

    rl.save_model_folder = recording_save  # every process calls it (a collective), the main one writes
    for job in jobs:
        algorithm, _, config_path = job.partition(":")
        algorithm, resume = algorithm.removesuffix("+resume"), algorithm.endswith("+resume")
        config_class, train = TRAINERS[algorithm]
        config = load_train_config(config_path, config_class)
        saved.clear()
        result = train(config, resume=resume, show_progress=False)
        record = {
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "sha256": weights_digest(result.model),
            "steps": result.steps,
            "metrics": result.metrics,
        }
        if "value" in saved:
            record["value_sha256"] = saved["value"]
        (Path(config.output_dir) / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])

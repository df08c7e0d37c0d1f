"""Data-parallel training with two CPU processes (gloo) under `accelerate launch`, for every trainer:
the processes must see different examples and end with bitwise identical weights.

On a machine without GPUs, `accelerate launch --cpu --num_processes 2` starts a single process
(accelerate 1.15 uses its plain launcher for --cpu unless given an MPI hostfile); `--multi_gpu`
starts two through torchrun, and the trainers' Accelerator(cpu=True) makes them a gloo group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from training_toys import preference_rows, sft_rows, untrained_reward_model, write

from openrlaif.training.checkpoint import weights_digest

pytestmark = pytest.mark.slow  # several processes (scripts/check.sh --fast leaves it out)

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(jobs: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(WORKER), *jobs,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_processes_see_different_data_and_end_with_identical_weights(
    tiny_gpt2: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    sft_data = write(tmp_path / "sft.jsonl", sft_rows(100))
    pref_data = write(tmp_path / "pairs.jsonl", preference_rows(100))
    common = dict(max_steps=6, learning_rate=1e-3, eval_every=3, save_every=3, eval_fraction=0.1,
                  record_example_ids=True, tensorboard=False)  # fmt: skip
    runs = {
        # gradient accumulation on SFT: DDP must skip the all-reduce on the first micro-step only
        "sft": dict(model=str(tiny_gpt2), data=str(sft_data), batch_size=4, grad_accum_steps=2, **common),
        "rm": dict(
            model=str(tiny_llama),
            data=str(pref_data),
            batch_size=4,
            model_type="causal_lm_value_head",
            **common,
        ),
        # DPO: the main process computes the reference log-probs, the other reads its file
        "dpo": dict(model=str(tiny_gpt2), data=str(pref_data), batch_size=4, **common),
    }
    jobs = []
    for algorithm, settings in runs.items():
        settings["output_dir"] = str(tmp_path / algorithm)
        config = tmp_path / f"{algorithm}.yaml"
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        jobs.append(f"{algorithm}:{config}")

    _launch_two_processes(jobs, tmp_path)

    for algorithm, settings in runs.items():
        out = Path(settings["output_dir"])
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2], algorithm
        assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{algorithm}: the processes' weights differ"
        assert ranks[0]["metrics"] == ranks[1]["metrics"]  # held-out metrics are reduced over both
        if algorithm == "dpo":  # training moved the policy away from the reference on held-out pairs
            assert ranks[0]["metrics"]["eval/rewards/margin"] != 0.0

        ids = [
            [json.loads(x) for x in (out / f"example_ids.rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)
        ]
        assert [row["step"] for row in ids[0]] == [row["step"] for row in ids[1]] == list(range(1, 7))
        per_step = settings["batch_size"] * settings.get("grad_accum_steps", 1)
        for row0, row1 in zip(*ids, strict=True):
            assert len(row0["ids"]) == len(row1["ids"]) == per_step
            assert not set(row0["ids"]) & set(row1["ids"]), (
                f"{algorithm} step {row0['step']}: shared examples"
            )
        # within an epoch (90 training examples: 11 micro-batches of 4 per process) nothing repeats
        micro = [
            [row["ids"][i : i + 4] for row in rows for i in range(0, len(row["ids"]), 4)] for rows in ids
        ]
        first_epoch = [i for batches in micro for batch in batches[:11] for i in batch]
        assert len(first_epoch) == len(set(first_epoch)) == 4 * 2 * min(11, len(micro[0])), algorithm

        # the saved model is the trained one, and training changed it
        if algorithm in ("sft", "dpo"):
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(out / "model")
            initial = AutoModelForCausalLM.from_pretrained(settings["model"])
        else:
            from openrlaif.models.heads import ValueHeadModel

            saved = ValueHeadModel.from_pretrained(str(out / "model"))
            initial = ValueHeadModel.from_pretrained(settings["model"])  # the body as it started
            assert weights_digest(saved.body) != weights_digest(initial.body), algorithm
        assert weights_digest(saved) == ranks[0]["sha256"], algorithm
        assert weights_digest(initial) != ranks[0]["sha256"], algorithm


def test_rl_reinforce_on_two_processes_shards_prompts_and_keeps_policy_and_value_model_identical(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    """REINFORCE with its value model, rewarded by a (random, untrained) reward model: two models
    under DDP on one optimizer; each process samples its own prompts with its own seeds."""
    from transformers import AutoModelForCausalLM

    from openrlaif.models.heads import TokenValueModel

    prompts = write(
        tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(32)]
    )
    rm_dir = untrained_reward_model(tiny_gpt2, tmp_path / "rm")
    out = tmp_path / "rl"
    settings = dict(
        model=str(tiny_gpt2), data=str(prompts), output_dir=str(out), algorithm="reinforce",
        reward={"type": "reward_model", "path": str(rm_dir)}, num_samples=2, batch_size=2,
        max_new_tokens=3, learning_rate=1e-2, max_steps=3, save_every=2, mixed_precision="no",
        record_example_ids=True, tensorboard=False,
    )  # fmt: skip
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    _launch_two_processes([f"rl:{config}"], tmp_path)

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [3, 3]
    ids = [
        [json.loads(x) for x in (out / f"example_ids.rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert [row["step"] for row in ids[0]] == [row["step"] for row in ids[1]] == [1, 2, 3]
    for row0, row1 in zip(*ids, strict=True):  # ids are "{prompt id}-{sample}", K = 2 per prompt
        prompts0, prompts1 = ({i.rsplit("-", 1)[0] for i in row["ids"]} for row in (row0, row1))
        assert len(row0["ids"]) == len(row1["ids"]) == 4 and len(prompts0) == len(prompts1) == 2
        assert not prompts0 & prompts1, f"step {row0['step']}: both processes took the same prompts"

    # identical policies and value models on both processes, equal to the saved ones, and trained
    assert ranks[0]["sha256"] == ranks[1]["sha256"], "the processes' policies differ"
    assert ranks[0]["value_sha256"] == ranks[1]["value_sha256"], "the processes' value models differ"
    assert weights_digest(AutoModelForCausalLM.from_pretrained(out / "model")) == ranks[0]["sha256"]
    assert weights_digest(AutoModelForCausalLM.from_pretrained(tiny_gpt2)) != ranks[0]["sha256"]
    saved_value = TokenValueModel.from_pretrained(str(out / "value"))
    assert weights_digest(saved_value) == ranks[0]["value_sha256"]
    initial_value = TokenValueModel.from_pretrained(str(tiny_gpt2))
    assert weights_digest(saved_value.body) != weights_digest(initial_value.body)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/value_loss"] > 0 for r in rows)


def test_lora_sft_dpo_and_rl_on_two_processes_keep_identical_adapters(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    """LoRA under DDP: only the adapters are in the gradient all-reduce (the frozen base is not a
    DDP parameter); both processes end with the same adapters and write adapter-only checkpoints
    and a merged export."""
    from transformers import AutoModelForCausalLM

    sft_data = write(tmp_path / "sft.jsonl", sft_rows(64))
    pref_data = write(tmp_path / "pairs.jsonl", preference_rows(64))
    prompts = write(
        tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(32)]
    )
    rm_dir = untrained_reward_model(tiny_gpt2, tmp_path / "rm")
    common = dict(model=str(tiny_gpt2), max_steps=3, learning_rate=1e-2, save_every=2, tensorboard=False,
                  mixed_precision="no", lora={"r": 4, "alpha": 8}, record_example_ids=True)  # fmt: skip
    runs = {
        "sft": dict(data=str(sft_data), batch_size=4, eval_every=0, eval_fraction=0.1, **common),
        "dpo": dict(data=str(pref_data), batch_size=4, eval_every=0, eval_fraction=0.1, **common),
        "rl": dict(
            data=str(prompts),
            algorithm="rloo",
            reward={"type": "reward_model", "path": str(rm_dir)},
            num_samples=2,
            batch_size=2,
            max_new_tokens=3,
            **common,
        ),
    }
    jobs = []
    for algorithm, settings in runs.items():
        settings["output_dir"] = str(tmp_path / algorithm)
        (tmp_path / f"{algorithm}.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
        jobs.append(f"{algorithm}:{tmp_path / f'{algorithm}.yaml'}")
    _launch_two_processes(jobs, tmp_path)

    initial = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    for algorithm, settings in runs.items():
        out = Path(settings["output_dir"])
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2], algorithm
        assert [r["steps"] for r in ranks] == [3, 3], algorithm
        assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{algorithm}: the processes' adapters differ"
        ids = [[json.loads(x)["ids"] for x in (out / f"example_ids.rank{r}.jsonl").read_text().splitlines()]
               for r in range(2)]  # fmt: skip
        assert all(not set(a) & set(b) for a, b in zip(*ids, strict=True)), f"{algorithm}: shared examples"
        checkpoint = out / "checkpoints" / "step-00000002" / "model"
        assert (checkpoint / "adapter_model.safetensors").is_file(), algorithm  # adapters only
        assert not (checkpoint / "model.safetensors").exists(), algorithm
        merged = AutoModelForCausalLM.from_pretrained(out / "model")  # the export: adapters merged in
        assert weights_digest(merged) != weights_digest(initial), f"{algorithm}: training changed nothing"


@pytest.fixture(autouse=True)
def _no_stray_accelerate_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A user's ~/.cache/huggingface/accelerate config must not change what the test launches."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_rloo_ppo_online_dpo_and_grpo_on_two_processes_keep_identical_weights(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    """Every other RL algorithm under DDP, as REINFORCE above: each process samples its own
    prompts, and both end with bitwise identical policies (and PPO's value models) that are the
    saved ones. GRPO runs two iterations x two minibatches per rollout (several updates per step)."""
    from transformers import AutoModelForCausalLM

    from openrlaif.models.heads import TokenValueModel

    prompts = write(
        tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(32)]
    )
    rm_dir = untrained_reward_model(tiny_gpt2, tmp_path / "rm")
    common = dict(model=str(tiny_gpt2), data=str(prompts), reward={"type": "reward_model", "path": str(rm_dir)},
                  num_samples=2, batch_size=2, max_new_tokens=3, learning_rate=1e-2, max_steps=2, save_every=2,
                  mixed_precision="no", record_example_ids=True, tensorboard=False)  # fmt: skip
    runs = {
        "rloo": {},
        "ppo": {},
        "online_dpo": {},
        "grpo": {"num_iterations": 2, "num_minibatches": 2},
    }
    jobs = []
    for algorithm, extra in runs.items():
        settings = {**common, **extra, "algorithm": algorithm, "output_dir": str(tmp_path / algorithm)}
        (tmp_path / f"{algorithm}.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
        jobs.append(f"rl:{tmp_path / f'{algorithm}.yaml'}")
    _launch_two_processes(jobs, tmp_path)

    initial = weights_digest(AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    for algorithm in runs:
        out = tmp_path / algorithm
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2], algorithm
        assert [r["steps"] for r in ranks] == [2, 2], algorithm
        assert ranks[0]["sha256"] == ranks[1]["sha256"], f"{algorithm}: the processes' policies differ"
        assert weights_digest(AutoModelForCausalLM.from_pretrained(out / "model")) == ranks[0]["sha256"], (
            algorithm
        )
        assert ranks[0]["sha256"] != initial, f"{algorithm}: training changed nothing"
        ids = [[json.loads(x)["ids"] for x in (out / f"example_ids.rank{r}.jsonl").read_text().splitlines()]
               for r in range(2)]  # fmt: skip
        for ids0, ids1 in zip(*ids, strict=True):  # "{prompt id}-{sample}": different prompts per process
            assert not {i.rsplit("-", 1)[0] for i in ids0} & {i.rsplit("-", 1)[0] for i in ids1}, algorithm
        if algorithm == "ppo":  # its value model too
            assert ranks[0]["value_sha256"] == ranks[1]["value_sha256"], "the processes' value models differ"
            assert (
                weights_digest(TokenValueModel.from_pretrained(str(out / "value")))
                == ranks[0]["value_sha256"]
            )

"""FSDP (version 2, torch's `fully_shard`) through `accelerate launch --config_file
configs/accelerate/fsdp2.yaml` on two CPU processes (gloo): every trainer ends with the weights a
single process gets on the same global batch (within float tolerance), a run killed after a
checkpoint resumes to the same weights, and `model/` is a plain HF folder.

The single-process runs take the same global batch as B x 2 accumulation steps: global micro-batch
j is the same examples either way (training/batching.py), and the loss of each half is averaged
the same way DDP/FSDP average the two processes' gradients. Models: the tiny Llama (no dropout,
so the processes' RNG streams do not enter the weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from training_toys import preference_rows, sft_rows, untrained_reward_model, write

from openrlaif.training.checkpoint import weights_digest

# one thread here as in the launched processes: float sums in another order would move the
# one-process weights by more than the tolerance below after a few AdamW steps
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
WORKER = Path(__file__).with_name("ddp_worker.py")
# FSDP against one process after 4 steps. Training moves the weights by 1e-2 or more; float32
# rounding (u = 6e-8 relative) compounded over 4 near-linear steps (see `common` below) stays
# around 1e-5 of that movement, a tenth of this; a gradient averaged wrongly over the two processes
# would leave them apart by half the movement
TOLERANCE = 1e-6
# the LM head projected 5 positions at a time (of the tiny Llama's 1,024-token vocabulary), so the
# chunked log-probs' gradients are reduced over the processes too (models/logprobs.py)
TINY_CHUNK = 5 * 1024 * 4 / 2**20
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _launch(
    jobs: list[str], tmp_path: Path, port: int, kill_at: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    env.pop("OPENRLAIF_KILL_AT_STEP", None)
    if kill_at is not None:
        env["OPENRLAIF_KILL_AT_STEP"] = str(kill_at)
    command = [str(ACCELERATE), "launch", "--config_file", str(FSDP_CONFIG), "--main_process_port", str(port),
               str(WORKER), *jobs]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _trainer(run: str) -> str:
    """The trainer (`openrlaif.training.TRAINERS`) of a run named after its algorithm."""
    return "rl" if run in ("rloo", "reinforce") else run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _weights(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    """A saved model folder's weights, loaded without accelerate."""
    if kind == "value":
        from openrlaif.models.heads import TokenValueModel

        return dict(TokenValueModel.from_pretrained(str(folder)).state_dict())
    if kind == "rm":
        from openrlaif.training.reward import RewardModel

        return dict(RewardModel.from_pretrained(str(folder)).model.state_dict())
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow  # several processes
def test_fsdp_trainers_match_one_process_and_resume_exactly(tiny_llama: Path, tmp_path: Path) -> None:
    from openrlaif.training import TRAINERS
    from openrlaif.training.config import load_train_config

    sft_data = write(tmp_path / "sft.jsonl", sft_rows(48))
    pref_data = write(tmp_path / "pairs.jsonl", preference_rows(48))
    prompts = write(
        tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(16)]
    )
    rm_dir = untrained_reward_model(tiny_llama, tmp_path / "reward-model")  # RL's reward

    # Float32 gradients computed by two processes and by one differ in their last bits: the kernels
    # block the same sums differently (other shapes, other memory alignment). AdamW with its default
    # eps turns such a difference into up to lr per step: for a gradient near zero m/sqrt(v) is ±1
    # whatever its size, so rounding can flip a step. With eps = 1 (far above every gradient here)
    # the step is lr·m/(sqrt(v) + 1), within 2x of lr·m: linear in the gradient, so a relative
    # rounding difference of ~1e-7 moves a weight by ~lr·1e-7·|g| per step, far below TOLERANCE,
    # while a gradient averaged wrongly over the processes (half of it, or twice) moves it by
    # ~lr·|g|/2, far above it (and, unlike under Adam's scale-free steps, visibly).
    common: dict[str, Any] = dict(model=str(tiny_llama), max_steps=4, learning_rate=0.1, adam_eps=1.0,
                                  save_every=2, tensorboard=False, mixed_precision="no", batch_size=4,
                                  logits_chunk_mib=TINY_CHUNK)  # fmt: skip
    # no length grouping: its global batches are cut to B x processes, so one process would group others
    supervised = dict(eval_every=2, eval_fraction=0.1, group_by_length=False, **common)
    runs: dict[str, dict[str, Any]] = {
        "sft": dict(data=str(sft_data), **supervised),
        "rm": dict(data=str(pref_data), model_type="causal_lm_value_head", **supervised),
        "dpo": dict(data=str(pref_data), **supervised),
        # RLOO: 2 prompts x 2 samples per process; the samples are seeded per (step, prompt, sample),
        # so one process with 4 prompts draws the same ones
        "rloo": dict(data=str(prompts), algorithm="rloo", reward={"type": "reward_model", "path": str(rm_dir)},
                   num_samples=2, max_new_tokens=4, **{**common, "batch_size": 2}),
    }  # fmt: skip
    # REINFORCE trains a value model beside the policy: the two are sharded as one module
    runs["reinforce"] = {**runs["rloo"], "algorithm": "reinforce"}

    def config_file(name: str, settings: dict[str, Any]) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(settings), encoding="utf-8")
        return path

    jobs = []
    for algorithm, settings in runs.items():
        jobs.append(
            f"{_trainer(algorithm)}:{config_file(algorithm, {**settings, 'output_dir': str(tmp_path / algorithm)})}"
        )
    proc = _launch(jobs, tmp_path, _free_port())
    assert proc.returncode == 0, proc.stdout[-2500:] + proc.stderr[-2500:]

    # runs killed right after step 3 (their newest checkpoint: step 2), then resumed
    resumed_jobs = []
    for algorithm in ("sft", "reinforce"):
        killed = config_file(
            f"{algorithm}-killed", {**runs[algorithm], "output_dir": str(tmp_path / f"{algorithm}-killed")}
        )
        proc = _launch([f"{_trainer(algorithm)}:{killed}"], tmp_path, _free_port(), kill_at=3)
        assert proc.returncode != 0, "the run was to be killed after step 3"
        assert (tmp_path / f"{algorithm}-killed" / "checkpoints" / "step-00000002").is_dir()
        assert not (tmp_path / f"{algorithm}-killed" / "model").exists()
        resumed_jobs.append(f"{_trainer(algorithm)}+resume:{killed}")
    proc = _launch(resumed_jobs, tmp_path, _free_port())
    assert proc.returncode == 0, proc.stdout[-2500:] + proc.stderr[-2500:]
    assert " ".join(proc.stdout.split()).count("resuming after step 2") == 2  # the console wraps lines

    for algorithm, settings in runs.items():
        out = tmp_path / algorithm
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2], algorithm
        assert [r["steps"] for r in ranks] == [4, 4], algorithm
        # the sharded model gathered on both processes is the one written to model/
        assert ranks[0]["sha256"] == ranks[1]["sha256"], algorithm
        kind = "rm" if algorithm == "rm" else "lm"
        sharded = _weights(out / "model", kind)  # a plain HF folder: loads without accelerate
        assert not (out / "model" / "pytorch_model_fsdp.bin").exists()
        if algorithm != "rm":
            from transformers import AutoModelForCausalLM

            assert weights_digest(AutoModelForCausalLM.from_pretrained(out / "model")) == ranks[0]["sha256"]

        # one process, the same global batch: B x 2 accumulation steps (RL: twice the prompts per step)
        single = {**settings, "output_dir": str(tmp_path / f"{algorithm}-single")}
        rl = _trainer(algorithm) == "rl"
        single |= {"batch_size": 4, "grad_accum_steps": 2} if rl else {"grad_accum_steps": 2}
        config_class, train = TRAINERS[_trainer(algorithm)]
        result = train(load_train_config(config_file(f"{algorithm}-single", single), config_class),
                       show_progress=False)  # fmt: skip
        one_process = _weights(result.model_dir, kind)
        difference = _max_difference(sharded, one_process)
        assert difference < TOLERANCE, f"{algorithm}: FSDP and one process differ by {difference}"
        if algorithm != "rm":  # and training moved the weights
            initial = _weights(tiny_llama, "lm")
            assert _max_difference(sharded, initial) > 1e3 * TOLERANCE, algorithm
        if not rl:  # the held-out metrics, reduced over both processes, are one process's
            for key, value in result.metrics.items():
                assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (algorithm, key)

    # killed after step 3 and resumed from step 2: the same weights as the runs never stopped
    for algorithm, logged in (("sft", "train/loss"), ("reinforce", "train/reward_mean")):
        resumed = _weights(tmp_path / f"{algorithm}-killed" / "model", "lm")
        assert _max_difference(resumed, _weights(tmp_path / algorithm / "model", "lm")) == 0.0, algorithm
        rows = [
            json.loads(x)
            for x in (tmp_path / f"{algorithm}-killed" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows if logged in r] == [1, 2, 3, 4], algorithm  # step 3 logged once
    value = _weights(tmp_path / "reinforce-killed" / "value", "value")
    assert _max_difference(value, _weights(tmp_path / "reinforce" / "value", "value")) == 0.0


def test_a_deepspeed_config_on_cpu_is_refused_rather_than_run_as_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate starts DeepSpeed only on GPUs: on CPU it would train plain DDP under a ZeRO config."""
    from openrlaif.errors import ConfigError
    from openrlaif.training.accelerator import make_accelerator
    from openrlaif.training.config import TrainConfig

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError) as error:
        make_accelerator(TrainConfig(model="tiny:llama", data="hh-harmless", output_dir="unused", cpu=True))
    assert str(error.value) == (
        "the accelerate config asks for DeepSpeed, which accelerate starts only on GPUs; on CPU processes "
        "use configs/accelerate/fsdp2.yaml (sharded like ZeRO-3) or configs/accelerate/ddp.yaml"
    )


def test_a_reward_model_is_sharded_one_transformer_block_at_a_time(tiny_llama: Path) -> None:
    """accelerate's FSDP2 wraps the classes a model names in `_no_split_modules`: a reward (or
    value) model names its body's blocks, so each block is its own FSDP unit and a forward gathers
    one block's weights at a time, not the whole model at once."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from openrlaif.models.heads import ValueHeadModel

    model = ValueHeadModel.from_pretrained(str(tiny_llama))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert wraps is not None
    wrapped = [type(m).__name__ for m in model.modules() if wraps(m)]
    assert wrapped == ["LlamaDecoderLayer"] * model.config.num_hidden_layers

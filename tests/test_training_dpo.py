"""Soft-label DPO on tiny real models (CPU): the loss math, the reference log-probs (computed once,
equal to a direct computation, reused on resume), learning a rule on a toy task while staying near
the reference, kill -9 + resume = uninterrupted, non-finite stop, one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from training_toys import MARKER, preference_rows, write

from openrlaif.data.examples import PreferenceExample
from openrlaif.errors import ConfigError, OpenRLAIFError
from openrlaif.models.logprobs import sequence_logprobs
from openrlaif.training.checkpoint import latest_checkpoint
from openrlaif.training.config import load_train_config, resolve_train_config_path
from openrlaif.training.dpo import REF_FILE, DPOConfig, collate, dpo_loss, train_dpo
from openrlaif.training.errors import TrainingError
from openrlaif.training.reward import load_preference_examples

# ---------------------------------------------------------------- the loss math


def _softplus(x: float) -> float:  # -log σ(-x)
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("delta", "p", "beta", "expected"),
    [
        # p = 1: standard sigmoid DPO, -log σ(βΔ)
        (4.0, 1.0, 0.1, _softplus(-0.4)),  # 0.513015
        (-10.0, 1.0, 0.05, _softplus(0.5)),  # 0.974077: the policy prefers the rejected one
        # p = 0.5: symmetric in Δ, minimal (log 2) at Δ = 0
        (0.0, 0.5, 0.1, math.log(2.0)),
        (4.0, 0.5, 0.1, 0.5 * _softplus(-0.4) + 0.5 * _softplus(0.4)),  # 0.713015
        # p = 0: the mirror image of p = 1
        (4.0, 0.0, 0.1, _softplus(0.4)),  # 0.913015
        (3.0, 0.8, 0.5, 0.8 * _softplus(-1.5) + 0.2 * _softplus(1.5)),  # 0.506532
        (2000.0, 0.0, 0.1, 200.0),  # stable far out: no inf
    ],
)
def test_dpo_loss_matches_hand_computed_values(delta: float, p: float, beta: float, expected: float) -> None:
    # Δ is split over policy and reference log-probs of both responses; only their combination counts
    ref_c, ref_r = torch.tensor([-12.0], dtype=torch.float64), torch.tensor([-9.5], dtype=torch.float64)
    pol_r = ref_r - 1.25
    pol_c = ref_c + delta + (pol_r - ref_r)
    loss, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, torch.tensor([p], dtype=torch.float64), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (r_c - r_r).item() == pytest.approx(beta * delta, rel=1e-9)
    assert r_r.item() == pytest.approx(beta * -1.25)


def test_dpo_loss_p1_is_sigmoid_dpo_p0_mirrors_and_gradient_vanishes_at_the_label() -> None:
    pol_c, pol_r = torch.tensor([-3.0, -7.0, -1.0, -2.0]), torch.tensor([-4.0, -5.0, -1.0, -9.0])
    ref_c, ref_r = torch.tensor([-3.5, -6.0, -2.0, -2.0]), torch.tensor([-4.0, -5.5, -1.0, -8.0])
    beta = 0.2
    ones = torch.ones(4)
    hard, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, ones, beta)
    delta = (pol_c - ref_c) - (pol_r - ref_r)
    assert torch.allclose(hard, -torch.nn.functional.logsigmoid(beta * delta))
    # p = 0 is p = 1 with the responses swapped
    mirrored, _, _ = dpo_loss(pol_r, pol_c, ref_r, ref_c, ones, beta)
    assert torch.allclose(dpo_loss(pol_c, pol_r, ref_c, ref_r, torch.zeros(4), beta)[0], mirrored)
    # dL/dΔ = β(σ(βΔ) - p): zero where the implicit preference σ(βΔ) equals the label
    d = delta.clone().requires_grad_(True)
    p = torch.sigmoid(beta * delta)
    dpo_loss(d, torch.zeros(4), torch.zeros(4), torch.zeros(4), p, beta)[0].sum().backward()
    assert torch.allclose(d.grad, torch.zeros(4), atol=1e-7)


# ---------------------------------------------------------------- learning, reference log-probs


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("dpo") / "labeled.jsonl", preference_rows(160))


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_dpo_learns_the_rule_near_the_reference_with_precomputed_reference_logprobs(
    share_prompt: bool, tiny_gpt2: Path, pref_data: Path, tmp_path: Path
) -> None:
    config = DPOConfig(
        model=str(tiny_gpt2), data=str(pref_data), output_dir=str(tmp_path / "dpo"), max_steps=15, batch_size=8,
        learning_rate=1e-3, beta=0.1, eval_every=5, save_every=15, eval_fraction=0.25, mixed_precision="no",
        share_prompt=share_prompt,
    )  # fmt: skip
    result = train_dpo(config, show_progress=False)
    before, after = result.first_metrics, result.metrics
    # before training the policy is the reference: Δ = 0 for every pair, loss log 2
    assert before["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert before["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    # after 15 steps of 8 pairs: the implicit reward ranks every held-out pair by the rule
    assert after["eval/accuracy"] >= 0.9 and after["eval/human_accuracy"] >= 0.9, after
    assert after["eval/rewards/margin"] > 0.2 and after["eval/loss"] < 0.65, after
    # ... while staying near the reference: |mean log π - log π_ref| over the held-out responses
    # (about 10 tokens each) below 4 nats, i.e. under 0.4 nats per token
    assert abs(after["eval/logratio"]) < 4.0, after

    # the policy itself now prefers a reply with the marker to the same reply without it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    policy = result.model.eval()
    prompt = "Human: Say something about time.\n\nAssistant:"
    probe = [PreferenceExample("probe", prompt, f"good day {MARKER} people", "good day time people", 1.0)]
    batch = collate(probe, torch.zeros(1, 2), tokenizer, 128)
    with torch.no_grad():
        pol = sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.labels)[0]
        ref = sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.labels)[0]
    assert (pol[0] - ref[0]) - (pol[1] - ref[1]) > 0

    # metrics.jsonl: every step has the DPO metrics; held-out rows at 0, 5, 10, 15
    rows = _rows(tmp_path / "dpo" / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 16))
    # dropout off (`disable_dropout`): at step 1 the policy in training mode is still the reference
    assert train_rows[0]["train/loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy", "learning_rate",
            "samples_per_s", "tokens_per_s")  # fmt: skip
    assert all(f"train/{k}" in r for r in train_rows for k in keys)
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 5, 10, 15]
    assert list((tmp_path / "dpo" / "tensorboard").glob("events.out.tfevents.*"))

    # the stored reference log-probs equal a direct computation with the initial model
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dpo" / REF_FILE), framework="pt") as fh:
        stored_train, stored_held = fh.get_tensor("train"), fh.get_tensor("held_out")
        assert len(fh.metadata()["data_hash"]) == 64
    from openrlaif.training.batching import split_held_out

    train_set, held_out = split_held_out(load_preference_examples(str(pref_data)), config)
    assert stored_train.shape == (len(train_set), 2) and stored_held.shape == (len(held_out), 2)
    for part, stored in ((train_set[:5], stored_train[:5]), (held_out[-3:], stored_held[-3:])):
        batch = collate(part, torch.zeros(len(part), 2), tokenizer, config.max_length)
        with torch.no_grad():  # the full-logits path of common.sequence_logprobs, one pair at a time
            direct = sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.labels)[0]
        assert torch.allclose(torch.stack(direct.chunk(2), -1), stored, atol=1e-4)


# ---------------------------------------------------------------- kill -9, resume


def _config_file(tmp_path: Path, name: str, **settings: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.mark.slow  # several processes
def test_sigkill_then_resume_reuses_reference_logprobs_and_ends_with_uninterrupted_weights(
    tiny_gpt2: Path, pref_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dropout kept on (GPT-2 has it): the resumed run matches only if the RNG states come back too;
    # batches grouped by length (the default): the grouped order must resume mid-epoch
    settings = dict(
        model=str(tiny_gpt2), data=str(pref_data), max_steps=8, batch_size=4, learning_rate=1e-3,
        warmup_ratio=0.2, eval_every=4, save_every=3, eval_fraction=0.1, limit=100, record_example_ids=True,
        tensorboard=False, mixed_precision="no", disable_dropout=False,
    )  # fmt: skip
    full = train_dpo(DPOConfig(output_dir=str(tmp_path / "full"), **settings), show_progress=False)
    killed = _config_file(tmp_path, "killed", output_dir=str(tmp_path / "killed"), **settings)
    env = {**os.environ, "OPENRLAIF_KILL_AT_STEP": "5", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "openrlaif.cli", "train", "dpo", "--config", str(killed), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint is not None and checkpoint.step == 3  # steps 4 and 5 were lost with the process
    ref_file = tmp_path / "killed" / REF_FILE
    written = ref_file.stat().st_mtime_ns

    config = load_train_config(killed, DPOConfig)
    with pytest.raises(ConfigError, match="already has a checkpoint"):  # no --resume: refuse to overwrite
        train_dpo(config, show_progress=False)

    def no_recompute(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr("openrlaif.training.dpo.compute_reference_logprobs", no_recompute)
    resumed = train_dpo(config, resume=True, show_progress=False)
    assert ref_file.stat().st_mtime_ns == written

    a, b = full.model.state_dict(), resumed.model.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert resumed.metrics == pytest.approx(full.metrics, rel=1e-6)
    for name in ("example_ids.rank0.jsonl", "metrics.jsonl"):
        drop = ("train/samples_per_s", "train/tokens_per_s")  # timings differ
        strip = [
            [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / run / name)]
            for run in ("full", "killed")
        ]
        assert strip[0] == strip[1], name


# ---------------------------------------------------------------- failures: one line


def test_non_finite_loss_stops_with_one_line_naming_the_step(
    tiny_gpt2: Path, pref_data: Path, tmp_path: Path
) -> None:
    config = DPOConfig(
        model=str(tiny_gpt2), data=str(pref_data), output_dir=str(tmp_path / "boom"), max_steps=6, batch_size=4,
        learning_rate=1e30, warmup_ratio=0.0, eval_every=0, save_every=1, limit=40, tensorboard=False,
        mixed_precision="no",
    )  # fmt: skip
    with pytest.raises(TrainingError) as info:
        train_dpo(config, show_progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("step ") and (" loss is " in message or " gradient norm is " in message), (
        message
    )
    step = int(message.split()[1].rstrip(":"))
    checkpoint = latest_checkpoint(tmp_path / "boom")
    assert step >= 2 and checkpoint is not None and checkpoint.step == step - 1
    assert f"the last good checkpoint is {checkpoint.path}" in message
    assert not (tmp_path / "boom" / "model").exists()


def test_bad_configs_and_data_are_one_line_errors(tiny_gpt2: Path, pref_data: Path, tmp_path: Path) -> None:
    base = dict(model=str(tiny_gpt2), data=str(pref_data), output_dir=str(tmp_path / "out"), max_steps=2)

    def error(**settings: Any) -> str:
        path = _config_file(tmp_path, "bad", **{**base, **settings})
        with pytest.raises(OpenRLAIFError) as info:
            train_dpo(load_train_config(path, DPOConfig), show_progress=False)
        message = str(info.value)
        assert "\n" not in message, message
        return message.replace(str(path), "CONFIG")

    assert error(beta=0).startswith("CONFIG: beta: Input should be greater than 0")
    assert error(bta=0.1) == "CONFIG: bta: Extra inputs are not permitted"
    assert error(ref_model=str(tmp_path / "nope")).startswith(f"model: cannot load '{tmp_path / 'nope'}'")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "p_chosen": "high"}\n')
    assert error(data=str(pairs)) == f"{pairs}:1: field 'p_chosen' must be a number in [0, 1]"
    assert error(data="no-such-data").startswith("data: 'no-such-data' is neither a built-in dataset")


def test_shipped_config_trains_on_hh_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENRLAIF_MODELS", str(tmp_path / "models"))  # `tiny:gpt2` is built here
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "max_steps=2",
        "limit=40",
        "max_length=96",
        "mixed_precision=no",
    ]
    config = load_train_config(resolve_train_config_path("dpo-tiny"), DPOConfig, overrides)
    assert config.data == "hh-harmless" and config.beta == 0.1
    result = train_dpo(config, show_progress=False)
    assert (result.model_dir / "model.safetensors").exists() and (tmp_path / "run" / REF_FILE).exists()
    assert result.first_metrics["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert math.isfinite(result.metrics["eval/loss"]) and result.steps == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prompt_logprobs_and_gradients_equal_the_concatenated_pass(
    arch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlaif.training.dpo import response_logprobs

    path = request.getfixturevalue(f"tiny_{arch}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = preference_rows(6)
    # prompts of different lengths: the shared path left-pads them
    examples = [
        PreferenceExample(r["id"], r["prompt"] + " and more" * i, r["chosen"], r["rejected"], 1.0)
        for i, r in enumerate(rows)
    ]
    grads = []
    values = []
    # plain and packed, each also padded to a multiple of 64 tokens (pad_to_multiple_of)
    for share, multiple in ((False, 1), (True, 1), (False, 64), (True, 64)):
        batch = collate(
            examples, torch.zeros(6, 2), tokenizer, 512, share_prompt=share, pad_multiple=multiple
        )
        assert batch.input_ids.shape[1] % multiple == 0
        model.zero_grad()
        logp = response_logprobs(model, batch)
        logp.sum().backward()
        values.append(logp.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert values[0].shape == (12,)
    for other in range(1, 4):
        assert torch.allclose(values[0], values[other], atol=1e-4), (values[0] - values[other]).abs().max()
        worst = max((grads[0][n] - grads[other][n]).abs().max().item() for n in grads[0])
        assert worst < 1e-4, worst
    # the shared batch counts each prompt once
    assert collate(examples, torch.zeros(6, 2), tokenizer, 512, share_prompt=True).n_tokens < (
        collate(examples, torch.zeros(6, 2), tokenizer, 512).n_tokens
    )


def test_pairs_share_their_prompt_tokens_and_auto_packs_only_models_that_give_the_same_logprobs(
    tiny_gpt2: Path, tiny_llama: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from openrlaif.models.loading import load_tokenizer
    from openrlaif.training.dpo import PROMPT, packing_matches, resolve_share_prompt, response_logprobs

    tokenizer = load_tokenizer(str(tiny_gpt2))
    long_prompt = "Human: " + "tell me about the day and the people " * 6 + "\n\nAssistant:"
    pair = PreferenceExample("x", long_prompt, "good " * 3 + MARKER, "bad " * 12 + "time", 1.0)
    # too long for 40 tokens: both responses follow the prompt cut for the longer one
    plain = collate([pair], torch.zeros(1, 2), tokenizer, 40)
    lengths = plain.attention_mask.sum(-1).tolist()
    n_prompt = plain.first_label
    assert (
        max(lengths) == 40
        and plain.input_ids[0, :n_prompt].tolist() == plain.input_ids[1, :n_prompt].tolist()
    )
    assert (plain.labels[:, :n_prompt] == -100).all() and (
        plain.labels[1, n_prompt : lengths[1]] != -100
    ).all()
    packed = collate([pair], torch.zeros(1, 2), tokenizer, 40, share_prompt=True)
    assert packed.segments is not None and (packed.segments[0, :n_prompt] == PROMPT).all()
    assert packed.input_ids.shape[1] == lengths[0] + lengths[1] - n_prompt  # the prompt once
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, plain), response_logprobs(model, packed), atol=1e-4)

    # auto: packed rows only where the model gives the plain log-probs with them
    examples = [
        PreferenceExample(r["id"], r["prompt"], r["chosen"], r["rejected"], 1.0) for r in preference_rows(4)
    ]
    config = DPOConfig(model="m", data="d", output_dir="o", max_length=128)
    cpu = torch.device("cpu")
    for path in (tiny_gpt2, tiny_llama):
        policy = AutoModelForCausalLM.from_pretrained(path)
        assert resolve_share_prompt(policy, examples, load_tokenizer(str(path)), config, False, cpu) == (
            True,
            "",
        )
    eager = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="eager")
    assert resolve_share_prompt(eager, examples, tokenizer, config, False, cpu) == (
        False, " (share_prompt auto: eager attention takes no packed rows)"
    )  # fmt: skip
    assert resolve_share_prompt(
        eager, examples, tokenizer, config.model_copy(update={"share_prompt": True}), False, cpu
    )[0]

    # a model that ignores the position ids (e.g. positions from the 2D mask, as ALiBi models) fails the check
    forward = model.forward

    def without_positions(*args: Any, position_ids: Any = None, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    model.forward = without_positions  # type: ignore[method-assign]
    assert not packing_matches(model, examples, tokenizer, config, False, cpu)
    assert resolve_share_prompt(model, examples, tokenizer, config, False, cpu)[0] is False

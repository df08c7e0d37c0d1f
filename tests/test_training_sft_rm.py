"""SFT and the soft-label reward model on tiny real models (CPU): the loss math, learning on toy
tasks with a known answer, kill -9 + resume = uninterrupted, non-finite stop, one-line errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from training_toys import MARKER, preference_rows, sft_rows, write

from openrlaif.cli import main
from openrlaif.data.chat import encode_prompt_completions
from openrlaif.models.logprobs import sequence_logprobs
from openrlaif.training import RewardConfig, RewardModel, SFTConfig, train_reward_model, train_sft
from openrlaif.training.batching import ShardedBatches
from openrlaif.training.checkpoint import latest_checkpoint, load_state_files, save_state_files
from openrlaif.training.config import PACKAGED_TRAIN_DIR
from openrlaif.training.losses import soft_label_loss
from openrlaif.training.reward import metrics_from_sums, preference_sums
from openrlaif.training.sft import collate, sft_loss

# ---------------------------------------------------------------- the loss math


@pytest.mark.parametrize(
    ("margin", "p", "expected"),
    [
        (0.0, 0.3, math.log(2.0)),  # no preference in the model: log 2 whatever the label
        (2.0, 1.0, math.log1p(math.exp(-2.0))),  # Bradley-Terry, chosen ahead: 0.126928
        (2.0, 0.0, 2.0 + math.log1p(math.exp(-2.0))),  # Bradley-Terry, label reversed: 2.126928
        (2.0, 0.5, 0.5 * math.log1p(math.exp(-2.0)) + 0.5 * (2.0 + math.log1p(math.exp(-2.0)))),  # 1.126928
        (1.0, 0.8, 0.8 * math.log1p(math.exp(-1.0)) + 0.2 * math.log1p(math.exp(1.0))),  # 0.513262
        (-3.0, 0.9, 0.9 * math.log1p(math.exp(3.0)) + 0.1 * math.log1p(math.exp(-3.0))),  # 2.753498
        (100.0, 0.0, 100.0),  # stable far out: log σ(-100) = -100, no inf
        (100.0, 1.0, 0.0),
    ],
)
def test_soft_label_loss_matches_hand_computed_values(margin: float, p: float, expected: float) -> None:
    r_rejected = torch.tensor([0.25], dtype=torch.float64)
    loss = soft_label_loss(r_rejected + margin, r_rejected, torch.tensor([p], dtype=torch.float64))
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_soft_label_loss_gradient_and_symmetry() -> None:
    margin = torch.tensor([-1.5, 0.0, 0.7, 3.0], requires_grad=True)
    p = torch.tensor([0.0, 0.8, 0.5, 1.0])
    soft_label_loss(margin, torch.zeros(4), p).sum().backward()
    # dL/d(margin) = σ(margin) - p: the gradient vanishes exactly when the model matches the label
    assert torch.allclose(margin.grad, torch.sigmoid(margin.detach()) - p, atol=1e-6)
    # swapping the two responses and using 1 - p is the same loss
    m = margin.detach()
    assert torch.allclose(soft_label_loss(m, torch.zeros(4), p), soft_label_loss(torch.zeros(4), m, 1 - p))


def test_accuracy_against_ai_and_human_labels_counts_ties_as_documented() -> None:
    r_chosen = torch.tensor([1.0, 2.0, 0.0, 1.0, 0.5])
    r_rejected = torch.tensor([0.0, 3.0, 1.0, 1.0, 0.0])  # margins 1, -1, -1, 0, 0.5
    p = torch.tensor([0.9, 0.6, 0.5, 1.0, 0.2])  # pair 3 is an AI tie: not counted
    human = torch.tensor([1.0, 0.0, 0.0, math.nan, 1.0])  # pair 4 has no human label
    m = metrics_from_sums(
        preference_sums(r_chosen, r_rejected, p, human, torch.ones(5, dtype=torch.float64)), "x"
    )
    # AI: right, wrong, (tie), zero margin = 0.5, wrong -> 1.5 / 4
    assert m["x/accuracy"] == pytest.approx(1.5 / 4)
    # human: right, right (human preferred the rejected one), right, (none), right -> 4 / 4
    assert m["x/human_accuracy"] == pytest.approx(1.0)
    assert m["x/margin"] == pytest.approx(-0.5 / 5)
    expected_loss = soft_label_loss(r_chosen, r_rejected, p).mean().item()
    assert m["x/loss"] == pytest.approx(expected_loss)


# ---------------------------------------------------------------- shared pieces


def test_sft_loss_is_hf_completion_only_loss_and_sequence_logprobs_ignore_padding(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    from openrlaif.data.examples import SFTExample

    examples = [SFTExample(f"e{i}", r["prompt"], r["completion"]) for i, r in enumerate(sft_rows(3))]
    examples.append(
        SFTExample("long", "Human: " + "tell me a long story " * 5 + "\n\nAssistant:", "Once upon a time.")
    )
    batch = collate(examples, tokenizer, max_length=128, append_eos=True)
    with torch.no_grad():
        ours = sft_loss(model, batch)
        hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        assert ours.item() == pytest.approx(hf.item(), rel=1e-5)
        # labels: only the completion and the appended EOS carry loss
        for row, ex in enumerate(examples):
            n_prompt = len(tokenizer(ex.prompt)["input_ids"])
            n_completion = len(tokenizer(" " + ex.completion, add_special_tokens=False)["input_ids"]) + 1
            labeled = (batch.labels[row] != -100).nonzero().flatten().tolist()
            assert labeled == list(range(n_prompt, n_prompt + n_completion))
            assert batch.labels[row, labeled[-1]].item() == tokenizer.eos_token_id
        # a sequence's log-prob is the same alone as in a right-padded batch
        batched, counts = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.labels)
        alone = collate(examples[:1], tokenizer, max_length=128, append_eos=True)
        single, count = sequence_logprobs(model, alone.input_ids, alone.attention_mask, alone.labels)
        assert counts[0] == count[0]
        assert batched[0].item() == pytest.approx(single[0].item(), abs=1e-4)
        # and equals the token-by-token sum
        ids = alone.input_ids[0]
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
        start = len(tokenizer(examples[0].prompt)["input_ids"])
        manual = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert single[0].item() == pytest.approx(manual, abs=1e-4)

        # padded to a multiple of 64 tokens (pad_to_multiple_of): a wider batch, the same loss
        wide = collate(examples, tokenizer, max_length=128, append_eos=True, pad_multiple=64)
        assert wide.input_ids.shape[1] % 64 == 0 and wide.input_ids.shape[1] > batch.input_ids.shape[1]
        assert wide.n_tokens == batch.n_tokens
        assert sft_loss(model, wide).item() == pytest.approx(ours.item(), rel=1e-5)


def test_truncation_keeps_bos_the_prompt_end_and_half_the_length_for_the_completion(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt, completion = "one two three four five six seven eight nine ten " * 6, "alpha beta gamma " * 20
    full_prompt = tokenizer(prompt)["input_ids"]
    ((ids, n_prompt),) = encode_prompt_completions(tokenizer, [prompt], [completion], 40, append_eos=True)
    assert len(ids) == 40 and n_prompt == 20  # the completion got half, the prompt the rest
    assert ids[0] == tokenizer.bos_token_id and ids[1:n_prompt] == full_prompt[-(n_prompt - 1) :]
    ((short, n_short),) = encode_prompt_completions(tokenizer, ["Hi"], ["there"], 40, append_eos=True)
    assert short[-1] == tokenizer.eos_token_id and short[:n_short] == tokenizer("Hi")["input_ids"]


def test_sharded_batches_cover_each_epoch_once_and_resume_mid_epoch() -> None:
    ranks = [ShardedBatches(23, 3, 2, r, seed=5) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 23 // (3 x 2): the incomplete last global batch is dropped
    epoch0 = [ranks[r].next_batch() for _ in range(3) for r in range(2)]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 18
    again = ShardedBatches(23, 3, 2, 1, seed=5)
    again.load_state_dict(ranks[1].state_dict())
    assert again.next_batch() == ranks[1].next_batch()  # same position, same next batch (epoch 1)
    assert ranks[1].epoch == 1


def test_length_grouped_batches_keep_the_epoch_cut_padding_and_resume_mid_epoch() -> None:
    import random

    rng = random.Random(7)
    lengths = [rng.randint(5, 200) for _ in range(101)]
    plain = [ShardedBatches(101, 4, 2, r, seed=3) for r in range(2)]
    grouped = [ShardedBatches(101, 4, 2, r, seed=3, lengths=lengths) for r in range(2)]
    assert grouped[0].batches_per_epoch == 12  # 101 // (4 x 2)

    def epoch(loaders: list[ShardedBatches]) -> list[list[int]]:  # global batches: both ranks' blocks
        return [[i for r in range(2) for i in loaders[r].next_batch()] for _ in range(12)]

    plain0, grouped0 = epoch(plain), epoch(grouped)
    # the same 96 examples as the ungrouped epoch (the same permutation, the same tail dropped)
    flat = [i for b in grouped0 for i in b]
    assert len(flat) == len(set(flat)) == 96 and set(flat) == {i for b in plain0 for i in b}

    def padding(batches: list[list[int]]) -> int:  # per process, each block padded to its longest
        return sum(max(lengths[i] for i in b[k : k + 4]) * 4 - sum(lengths[i] for i in b[k : k + 4])
                   for b in batches for k in (0, 4))  # fmt: skip

    assert padding(grouped0) < 0.4 * padding(plain0), (padding(grouped0), padding(plain0))
    # the order of the batches is shuffled, not longest first throughout
    widths = [max(lengths[i] for i in b) for b in grouped0]
    assert widths != sorted(widths, reverse=True)
    # a new epoch regroups a new permutation; a loader restored mid-epoch continues exactly
    assert epoch(grouped) != grouped0
    restored = ShardedBatches(101, 4, 2, 1, seed=3, lengths=lengths)
    for _ in range(5):
        grouped[1].next_batch()
    restored.load_state_dict(grouped[1].state_dict())
    assert [restored.next_batch() for _ in range(9)] == [grouped[1].next_batch() for _ in range(9)]
    with pytest.raises(ValueError, match="100 lengths for 101 examples"):
        ShardedBatches(101, 4, 2, 0, seed=3, lengths=lengths[:100])


def test_chat_template_prompts_are_encoded_as_generation_encodes_them_and_only_completions_carry_loss(
    tiny_llama: Path, tiny_gpt2: Path
) -> None:
    from openrlaif.data.chat import encode_prompt, resolve_chat_template
    from openrlaif.data.examples import PreferenceExample, SFTExample
    from openrlaif.errors import ConfigError
    from openrlaif.models.loading import load_tokenizer
    from openrlaif.training.dpo import collate as dpo_collate
    from openrlaif.training.reward import encode_texts

    tokenizer = load_tokenizer(str(tiny_llama))  # pad = eos, as in training
    assert resolve_chat_template(tokenizer, "auto", "m") and not resolve_chat_template(tokenizer, "off", "m")
    gpt2 = load_tokenizer(str(tiny_gpt2))  # no chat template: auto is plain text, on is an error
    assert not resolve_chat_template(gpt2, "auto", "m")
    with pytest.raises(
        ConfigError, match=r"^chat_template: 'on' but the tokenizer of 'm' has no chat template"
    ):
        resolve_chat_template(gpt2, "on", "m")

    dialogue = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What does the cow say?\n\nAssistant:"
    examples = [SFTExample("a", dialogue, " The cow says moo."), SFTExample("b", "Short?", "Yes.")]
    batch = collate(examples, tokenizer, max_length=256, append_eos=True, chat=True)
    for row, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, ex.prompt, True)  # what `generate` and RL feed the policy
        completion = tokenizer(ex.completion.strip(), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        n = len(prompt) + len(completion)
        assert batch.input_ids[row, :n].tolist() == prompt + completion
        labeled = (batch.labels[row] != -100).nonzero().flatten().tolist()
        assert labeled == list(range(len(prompt), n))  # the completion and its EOS, nothing else
    # the dialogue became turns, ending with the generation prompt
    assert tokenizer.decode(encode_prompt(tokenizer, dialogue, True)) == (
        "<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n<|user|>\nWhat does the cow say?</s>\n<|assistant|>\n"
    )
    # plain text (off) keeps the old encoding: the prompt with BOS, a space, the completion
    plain = collate(examples[:1], tokenizer, max_length=256, append_eos=True)
    assert (
        plain.input_ids[0, : len(tokenizer(dialogue)["input_ids"])].tolist()
        == tokenizer(dialogue)["input_ids"]
    )

    # DPO and the reward model: both responses follow the same prompt tokens
    pair = [PreferenceExample("p", dialogue, "Moo.", "I do not know.", 1.0)]
    prompt = encode_prompt(tokenizer, dialogue, True)
    dpo_batch = dpo_collate(pair, torch.zeros(1, 2), tokenizer, 256, chat=True)
    for row, response in enumerate(("Moo.", "I do not know.")):
        ids = prompt + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert dpo_batch.input_ids[row, : len(ids)].tolist() == ids
        assert (dpo_batch.labels[row] != -100).nonzero().flatten().tolist() == list(
            range(len(prompt), len(ids))
        )
    rm_ids, rm_mask = encode_texts(tokenizer, [dialogue], ["Moo."], 256, chat=True)
    assert (
        rm_ids[0, : int(rm_mask.sum())].tolist()
        == prompt + tokenizer("Moo.", add_special_tokens=False)["input_ids"]
    )


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    save_state_files(optimizer.state_dict(), tmp_path, "optimizer")
    assert (tmp_path / "optimizer.safetensors").exists() and (tmp_path / "optimizer.json").exists()
    restored = load_state_files(tmp_path, "optimizer")
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # betas stay a tuple, ids stay ints
    assert set(restored["state"]) == set(original["state"])
    for key, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value)
    optimizer.load_state_dict(restored)


# ---------------------------------------------------------------- learning


def _run_config(tmp_path: Path, name: str, **settings: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("sft") / "toy.jsonl", sft_rows(200))


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("rm") / "labeled.jsonl", preference_rows(400))


def test_sft_lowers_held_out_loss_and_logs_everywhere(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path
) -> None:
    config = SFTConfig(
        model=str(tiny_gpt2), data=str(sft_data), output_dir=str(tmp_path / "sft"), max_steps=30, batch_size=8,
        learning_rate=3e-3, eval_every=10, save_every=10, eval_fraction=0.1,
    )  # fmt: skip
    result = train_sft(config, show_progress=False)
    before, after = result.first_metrics["eval/loss"], result.metrics["eval/loss"]
    assert before > 6.0  # a random model over a 1k vocabulary: about log(1024) = 6.9
    assert after < 0.5 * before, (before, after)

    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for key in ("train/learning_rate", "train/samples_per_s", "train/tokens_per_s", "train/grad_norm"):
        assert all(r[key] > 0 for r in train_rows[:-1]), key
    assert train_rows[-1]["train/samples_per_s"] > 0
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 10, 20, 30]
    assert list((tmp_path / "sft" / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert (result.model_dir / "model.safetensors").exists()
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("arch", "model_type"), [("gpt2", "sequence_classification"), ("llama", "causal_lm_value_head")]
)
def test_reward_model_learns_the_rule_from_soft_ai_labels(
    arch: str, model_type: str, pref_data: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model_path = request.getfixturevalue(f"tiny_{arch}")
    config = RewardConfig(
        model=str(model_path), model_type=model_type, data=str(pref_data), output_dir=str(tmp_path / "rm"),
        max_steps=40, batch_size=16, learning_rate=1e-3, eval_every=0, save_every=40, eval_fraction=0.2,
    )  # fmt: skip
    result = train_reward_model(config, show_progress=False)
    assert result.first_metrics["eval/accuracy"] < 0.75  # not solved before training
    assert result.metrics["eval/accuracy"] >= 0.9, result.metrics
    assert result.metrics["eval/human_accuracy"] >= 0.9, result.metrics
    # soft labels (p_chosen 0.7-1.0) keep the loss above 0: their mean entropy is about 0.38 nats
    assert 0.3 < result.metrics["eval/loss"] < result.first_metrics["eval/loss"]

    # the saved folder scores text on its own, and agrees with the trained model
    reward_model = RewardModel.from_pretrained(result.model_dir)
    rows = preference_rows(400)[-60:]
    prompts = [r["prompt"] for r in rows]
    chosen = reward_model.score(prompts, [r["chosen"] for r in rows])
    # ... in the prompt format it was trained with (the tiny Llama has a chat template: auto used it)
    from openrlaif.training.reward import encode_texts, reward_of

    assert reward_model.chat is (arch == "llama")
    responses = [r["chosen"] for r in rows[:4]]
    with torch.no_grad():
        for chat in (False, True) if arch == "llama" else (False,):  # GPT-2's tokenizer has no template
            ids, mask = encode_texts(reward_model.tokenizer, prompts[:4], responses, config.max_length, chat)
            same = torch.allclose(reward_of(reward_model.model, ids, mask), chosen[:4], atol=1e-6)
            assert same is (chat == reward_model.chat), chat
    rejected = reward_model.score(prompts, [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean().item() >= 0.9
    # batches padded to a multiple of 64 tokens (pad_to_multiple_of) score the same
    reward_model.pad_multiple = 64
    assert torch.allclose(reward_model.score(prompts, [r["chosen"] for r in rows]), chosen, atol=1e-5)
    reward_model.pad_multiple = 1
    with_marker = reward_model.score(prompts[:1], [f"good day {MARKER} people"])
    without = reward_model.score(prompts[:1], ["good day time people"])
    assert with_marker.item() > without.item()

    # responses as another tokenizer's ids (the policy's) are decoded and re-tokenized
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(
        request.getfixturevalue("tiny_llama" if arch == "gpt2" else "tiny_gpt2")
    )
    policy_ids = [
        other(" " + r["chosen"], add_special_tokens=False)["input_ids"] + [other.eos_token_id]
        for r in rows[:8]
    ]
    assert torch.allclose(
        reward_model.score_generations(prompts[:8], policy_ids, other), chosen[:8], atol=1e-5
    )


def test_bf16_autocast_trains(tiny_gpt2: Path, sft_data: Path, tmp_path: Path) -> None:
    config = SFTConfig(
        model=str(tiny_gpt2), data=str(sft_data), output_dir=str(tmp_path / "bf16"), max_steps=15, batch_size=8,
        learning_rate=3e-3, eval_every=0, save_every=15, eval_fraction=0.1, mixed_precision="bf16",
    )  # fmt: skip
    result = train_sft(config, show_progress=False)
    assert result.metrics["eval/loss"] < result.first_metrics["eval/loss"] - 1.0
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # fp32 master weights


# ---------------------------------------------------------------- kill -9, resume


def _cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("algorithm", ["sft", "rm"])
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(
    algorithm: str, tiny_gpt2: Path, sft_data: Path, pref_data: Path, tmp_path: Path
) -> None:
    # GPT-2 has dropout, so the resumed run matches only if the RNG states come back too;
    # gradient accumulation (sft) and a learning-rate schedule make the position matter.
    settings = dict(
        model=str(tiny_gpt2), data=str(sft_data if algorithm == "sft" else pref_data), max_steps=10,
        batch_size=4, grad_accum_steps=2 if algorithm == "sft" else 1, learning_rate=1e-3, warmup_ratio=0.2,
        eval_every=5, save_every=4, eval_fraction=0.1, limit=120, record_example_ids=True, tensorboard=False,
    )  # fmt: skip
    full = _run_config(tmp_path, "full", output_dir=str(tmp_path / "full"), **settings)
    killed = _run_config(tmp_path, "killed", output_dir=str(tmp_path / "killed"), **settings)
    assert main(["train", algorithm, "--config", str(full), "--quiet"]) == 0

    proc = subprocess.run(
        [sys.executable, "-m", "openrlaif.cli", "train", algorithm, "--config", str(killed), "--quiet"],
        env=_cli_env(OPENRLAIF_KILL_AT_STEP="6"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert checkpoint is not None and checkpoint.step == 4  # steps 5 and 6 were lost with the process
    assert not (tmp_path / "killed" / "model").exists()

    # the same command again, without --resume, refuses to overwrite the run
    assert main(["train", algorithm, "--config", str(killed), "--quiet"]) == 2
    assert main(["train", algorithm, "--config", str(killed), "--quiet", "--resume"]) == 0

    a, b = (
        _weights(tmp_path / "full" / "model" / "model.safetensors"),
        _weights(tmp_path / "killed" / "model" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    for name in ("example_ids.rank0.jsonl", "metrics.jsonl"):
        rows_a = [json.loads(x) for x in (tmp_path / "full" / name).read_text().splitlines()]
        rows_b = [json.loads(x) for x in (tmp_path / "killed" / name).read_text().splitlines()]
        drop = ("train/samples_per_s", "train/tokens_per_s")  # timings differ
        strip = [[{k: v for k, v in r.items() if k not in drop} for r in rows] for rows in (rows_a, rows_b)]
        assert strip[0] == strip[1], name  # same examples at every step, same losses, no repeated rows


# ---------------------------------------------------------------- failures: one line, nothing lost


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _run_config(
        tmp_path, "boom", model=str(tiny_gpt2), data=str(sft_data), output_dir=str(tmp_path / "boom"),
        max_steps=8, batch_size=4, learning_rate=1e30, warmup_ratio=0.0, eval_every=0, save_every=1,
    )  # fmt: skip
    assert main(["train", "sft", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    match = re.match(
        r"error: step (\d+): (loss|gradient norm) is (nan|inf|-inf) \(the last good checkpoint is (\S+);", err
    )
    assert match, err
    step = int(match.group(1))
    assert step >= 2  # step 1 is computed with the initial weights
    checkpoint = latest_checkpoint(tmp_path / "boom")
    assert checkpoint is not None and checkpoint.step == step - 1 and str(checkpoint.path) == match.group(4)
    assert not (tmp_path / "boom" / "model").exists()
    weights = _weights(checkpoint.model_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow  # several processes
def test_a_second_run_on_the_same_output_dir_is_refused_and_the_first_finishes_intact(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from writers import paused_writer

    out = tmp_path / "sft"
    config = _run_config(
        tmp_path, "sft", model=str(tiny_gpt2), data=str(sft_data), output_dir=str(out), max_steps=4,
        batch_size=4, eval_every=0, save_every=2, limit=40, tensorboard=False,
    )  # fmt: skip
    command = [sys.executable, "-m", "openrlaif.cli", "train", "sft", "--config", str(config), "--quiet"]
    with paused_writer(command, out, _cli_env()) as first:
        for second in (["--quiet"], ["--quiet", "--resume"]):
            assert main(["train", "sft", "--config", str(config), *second]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {out} is being written by pid {first.pid} (openrlaif train sft ")
            assert err.count("\n") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 4]  # each step once (4: training, then the held-out evaluation)
    assert latest_checkpoint(out).step == 4 and (out / "model" / "model.safetensors").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import errno

    from openrlaif.training import checkpoint as common

    out = tmp_path / "sft"
    config = _run_config(
        tmp_path, "sft", model=str(tiny_gpt2), data=str(sft_data), output_dir=str(out), max_steps=6,
        batch_size=4, eval_every=0, save_every=2, limit=40, tensorboard=False,
    )  # fmt: skip
    real_save = common.save_state_files

    def save_until_the_disk_fills(state: dict[str, Any], directory: Path, name: str) -> None:
        if directory.name == ".step-00000004.tmp":  # the disk fills up while the second one is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(state, directory, name)

    monkeypatch.setattr(common, "save_state_files", save_until_the_disk_fills)
    assert main(["train", "sft", "--config", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: {out / 'checkpoints' / 'step-00000004'}: the disk is full (no space left on device); what was "
        "saved before is kept: free some space and run the same command again to go on from there\n"
    )
    assert latest_checkpoint(out).step == 2  # the complete one; the half-written one is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]

    monkeypatch.undo()  # space freed
    assert main(["train", "sft", "--config", str(config), "--quiet", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]
    assert latest_checkpoint(out).step == 6


def test_bad_configs_and_data_are_one_line_errors_naming_the_file_and_setting(
    tiny_gpt2: Path, sft_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = dict(model=str(tiny_gpt2), output_dir=str(tmp_path / "out"), max_steps=2)

    def error(algorithm: str, path: Path, *extra: str) -> str:
        assert main(["train", algorithm, "--config", str(path), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: "), err
        return err.removeprefix("error: ")

    typo = _run_config(tmp_path, "typo", data=str(sft_data), learning_rat=1e-3, **base)
    assert error("sft", typo) == f"{typo}: learning_rat: Extra inputs are not permitted"
    bad = _run_config(tmp_path, "bad", data=str(sft_data), batch_size=0, **base)
    assert error("sft", bad).startswith(f"{bad}: batch_size: Input should be greater than or equal to 1")
    wrong_type = _run_config(
        tmp_path, "wrong", data=str(sft_data), model_type="sequence_classification", **base
    )
    assert "model_type: Extra inputs are not permitted" in error("sft", wrong_type)
    bad_rm = _run_config(tmp_path, "badrm", data=str(sft_data), model_type="value", **base)
    assert error("rm", bad_rm).startswith(
        f"{bad_rm}: model_type: Input should be 'sequence_classification' or"
    )
    assert (
        error("sft", typo, "--set", "learning_rat")
        == "--set 'learning_rat': expected KEY=VALUE, e.g. --set max_steps=100"
    )
    assert error("sft", bad, "--set", "batch_size=-1").startswith(f"{bad} (with --set): batch_size:")
    assert error("sft", tmp_path / "missing.yaml").startswith(
        f"{tmp_path / 'missing.yaml'}: no such file, and not a shipped training config"
    )
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert error("sft", tmp_path / "broken.yaml").startswith(f"{tmp_path / 'broken.yaml'}:2: invalid YAML")

    nowhere = _run_config(tmp_path, "nowhere", data="no-such-dataset", **base)
    assert error("sft", nowhere).startswith(
        "data: 'no-such-dataset' is neither a built-in dataset (hh-harmless)"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    no_field = _run_config(tmp_path, "nofield", data=str(rows), **base)
    assert error("sft", no_field).startswith(f"{rows}:2: missing field 'completion'")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "p_chosen": 1.5}\n')
    assert (
        error("rm", _run_config(tmp_path, "p", data=str(pairs), **base))
        == f"{pairs}:1: field 'p_chosen' must be a number in [0, 1]"
    )
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text('{"prompt": "a", "response_a": "b", "response_b": "c"}\n')
    assert error("rm", _run_config(tmp_path, "u", data=str(unlabeled), **base)).startswith(
        f"{unlabeled}:1: no label"
    )
    bad_model = _run_config(
        tmp_path, "model", data=str(sft_data), **{**base, "model": str(tmp_path / "nope")}
    )
    assert error("sft", bad_model).startswith(f"model: cannot load '{tmp_path / 'nope'}'")
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    big_batch = _run_config(tmp_path, "big", data=str(two), batch_size=8, **base)
    assert error("sft", big_batch) == (
        "batch_size 8 x 1 process(es) needs at least 8 training examples; the data has 1 after the held-out split"
    )


def test_shipped_configs_run_on_the_offline_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENRLAIF_MODELS", str(tmp_path / "models"))  # `tiny:gpt2` is built here
    assert {"rm-tiny", "sft-tiny"} <= {p.stem for p in PACKAGED_TRAIN_DIR.glob("*.yaml")}
    for algorithm, name in (("sft", "sft-tiny"), ("rm", "rm-tiny")):
        out = tmp_path / name
        # `mixed_precision=no`: YAML reads a bare `no` as false, which must still mean "no"
        settings = [f"output_dir={out}", "max_steps=2", "limit=60", "max_length=96", "mixed_precision=no"]
        overrides = [arg for setting in settings for arg in ("--set", setting)]
        assert main(["train", algorithm, "--config", name, "--quiet", *overrides]) == 0
        printed = capsys.readouterr().out
        assert "held-out before training: eval/loss" in printed and f"model -> {out / 'model'}" in printed
        assert (out / "model" / "model.safetensors").exists()
    assert (tmp_path / "models" / "tiny-gpt2" / "config.json").exists()


def test_reward_model_loader_takes_any_one_output_classifier_and_refuses_others(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from openrlaif.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    for labels in (1, 2):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp_path / f"cls{labels}")
        tokenizer.save_pretrained(tmp_path / f"cls{labels}")
    scores = RewardModel.from_pretrained(tmp_path / "cls1").score(
        ["Human: hi\n\nAssistant:"] * 2, ["Hello.", "Go away."]
    )
    assert scores.shape == (2,) and scores[0] != scores[1]
    with pytest.raises(ConfigError, match="has 2 outputs; a reward model needs 1"):
        RewardModel.from_pretrained(tmp_path / "cls2")

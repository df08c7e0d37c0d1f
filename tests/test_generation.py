"""`openrlaif generate` and `sample()`: tiny real models in process, and the local
OpenAI-compatible test server (tests/openai_server.py) over real sockets."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from openai_server import LocalLM, OpenAITestServer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

from openrlaif.cli import build_parser
from openrlaif.cli.generate import cmd_generate
from openrlaif.data.chat import to_messages
from openrlaif.data.io import read_pairs
from openrlaif.data.records import PromptRecord
from openrlaif.errors import ConfigError, GenerationError, InputError
from openrlaif.generation import (
    GenerateConfig,
    build_pairs,
    generate,
    load_generate_config,
)
from openrlaif.inference.local import eos_token_ids, finish_reason, sample, sampling_processors

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "Hello there, how are",
    "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke about cats\n\nAssistant:",
]


def load(path: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2: Path) -> tuple[Any, Any]:
    return load(tiny_gpt2)


@pytest.fixture(scope="module")
def gpt2_eos(tiny_gpt2: Path) -> tuple[Any, Any]:
    """The tiny GPT-2 with a bias towards EOS, so some samples stop early and some run to the limit."""
    model, tokenizer = load(tiny_gpt2)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = 4.5
    model.set_output_embeddings(biased)
    return model, tokenizer


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*argv: str) -> int:
    return cmd_generate(build_parser(["generate"]).parse_args(["generate", *argv, "--quiet"]))


# ---------------------------------------------------------------- sample()


def test_sample_shape_and_reproducible_whatever_the_batch(gpt2) -> None:
    model, tokenizer = gpt2
    one = sample(model, tokenizer, PROMPTS, n=4, max_new_tokens=8, batch_size=1, seed=3)
    five = sample(model, tokenizer, PROMPTS, n=4, max_new_tokens=8, batch_size=5, seed=3)
    assert len(one) == 12
    assert one == five  # ids and text, sample by sample
    for i, s in enumerate(one):  # prompt-major
        assert s.prompt_ids == tokenizer(PROMPTS[i // 4])["input_ids"]
        assert 1 <= len(s.response_ids) <= 8
        assert s.response_text == tokenizer.decode(s.response_ids, skip_special_tokens=True).strip()
    assert len({tuple(s.response_ids) for s in one[:4]}) > 1  # samples, not four copies
    # A sample depends on its own key and index only, not on the other prompts in the call.
    tail = sample(model, tokenizer, PROMPTS[1:], n=4, max_new_tokens=8, seed=3, keys=["1", "2"])
    assert tail == one[4:]
    other_seed = sample(model, tokenizer, PROMPTS, n=4, max_new_tokens=8, seed=4)
    assert sum(a.response_ids != b.response_ids for a, b in zip(one, other_seed, strict=True)) >= 10


def test_sampling_follows_temperature_and_top_p() -> None:
    """The Gumbel-max sampler draws from softmax(logits / T) cut to the top-p nucleus."""
    assert sampling_processors(0.0, 0.9, [0]) is None  # temperature 0: plain greedy
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits / 0.9, dim=-1)  # 0.602, 0.198, 0.114, 0.065, 0.021
    nucleus = probs[:3] / probs[:3].sum()  # the smallest set holding >= 0.9
    counts: Counter[int] = Counter()
    processors = sampling_processors(0.9, 0.9, range(400))
    scores = logits.expand(400, -1)
    for _ in range(10):  # each call draws the next noise from every row's generator
        counts.update(processors(torch.zeros((400, 1), dtype=torch.long), scores.clone()).argmax(-1).tolist())
    assert counts[3] == counts[4] == 0
    for token in range(3):
        assert counts[token] / 4000 == pytest.approx(float(nucleus[token]), abs=0.03)


def test_stops_at_eos_and_respects_max_new_tokens(gpt2_eos) -> None:
    model, tokenizer = gpt2_eos
    eos = eos_token_ids(model, tokenizer)
    samples = sample(model, tokenizer, PROMPTS, n=4, max_new_tokens=10, batch_size=12)
    reasons = Counter(finish_reason(s.response_ids, eos) for s in samples)
    assert reasons["stop"] >= 2 and reasons["length"] >= 1  # both kinds, in one batch
    for s in samples:
        assert not eos & set(s.response_ids[:-1])  # nothing generated after an EOS is kept
        if finish_reason(s.response_ids, eos) == "length":
            assert len(s.response_ids) == 10
        assert "<|endoftext|>" not in s.response_text
    assert samples == sample(model, tokenizer, PROMPTS, n=4, max_new_tokens=10, batch_size=1)


def test_llama_chat_template(gpt2, tiny_llama: Path) -> None:
    model, tokenizer = load(tiny_llama)
    messages = to_messages(PROMPTS[2])
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell me a joke about cats"},
    ]
    assert to_messages("Summarize: x") == [{"role": "user", "content": "Summarize: x"}]
    samples = sample(model, tokenizer, PROMPTS, n=3, max_new_tokens=6, batch_size=2)
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.startswith("<|user|>\nhi</s>\n<|assistant|>\nhello</s>")
    assert samples[6].prompt_ids == tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert samples == sample(model, tokenizer, PROMPTS, n=3, max_new_tokens=6, batch_size=9)
    plain = sample(model, tokenizer, PROMPTS[:1], n=1, max_new_tokens=2, chat_template="off")
    assert plain[0].prompt_ids == tokenizer(PROMPTS[0])["input_ids"]  # <s> + the raw text
    gpt2_model, gpt2_tokenizer = gpt2
    with pytest.raises(ConfigError, match="chat_template is 'on'"):
        sample(gpt2_model, gpt2_tokenizer, PROMPTS, n=1, chat_template="on")
    with pytest.raises(GenerationError, match="prompt '0' is .* tokens; with max_new_tokens=5000"):
        sample(model, tokenizer, PROMPTS, n=1, max_new_tokens=5000)


# ---------------------------------------------------------------- the job


def test_resume_writes_only_missing_samples(tiny_gpt2: Path, tmp_path: Path, capsys) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    common = [
        "--policy",
        str(tiny_gpt2),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "5",
    ]
    assert run_cli(*common, "--out", str(full), "-n", "3") == 0
    everything = rows(full)
    assert len(everything) == 9 and len({r["id"] for r in everything}) == 9
    assert Counter(r["prompt_id"] for r in everything) == {"p0": 3, "p1": 3, "p2": 3}
    first = everything[0]
    assert set(first) == {
        "id",
        "prompt_id",
        "prompt",
        "response",
        "sample_index",
        "policy",
        "num_tokens",
        "finish_reason",
    }
    assert first["id"] == f"{first['prompt_id']}-{first['sample_index']}" and first["policy"] == str(
        tiny_gpt2
    )

    # A job killed while writing: four complete rows and a torn fifth one.
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:25])
    capsys.readouterr()
    run_cli(*common, "--out", str(part), "-n", "3")
    assert "5 new, 4 already done" in capsys.readouterr().out
    again = rows(part)
    assert len(again) == 9 and {r["id"]: r for r in again} == {r["id"]: r for r in everything}

    # Nothing missing: nothing written; more samples per prompt: only the new ones.
    run_cli(*common, "--out", str(part), "-n", "3")
    assert "0 new, 9 already done" in capsys.readouterr().out
    run_cli(*common, "--out", str(part), "-n", "4")
    assert "3 new, 9 already done" in capsys.readouterr().out
    assert sorted(r["id"] for r in rows(part)) == sorted(f"p{i}-{k}" for i in range(3) for k in range(4))


def test_pairs_of_distinct_responses() -> None:
    prompt_rows = [
        ("a", 0, "x"),
        ("a", 1, "y"),
        ("a", 2, "x"),
        ("a", 3, " "),
        ("a", 4, "z"),
        ("b", 0, "only"),
    ]
    found = [{"prompt_id": p, "sample_index": k, "response": t} for p, k, t in prompt_rows]
    prompts = [PromptRecord("a", "A?"), PromptRecord("b", "B?")]
    pairs = build_pairs(found, prompts, n=5, per_prompt=None, seed=0)
    # "x" twice counts once (sample 0), the blank one never: x, y, z give three pairs; "b" has none.
    assert [(p["id"], p["response_a"], p["response_b"]) for p in pairs] == [
        ("a-0-1", "x", "y"), ("a-0-4", "x", "z"), ("a-1-4", "y", "z"),
    ]  # fmt: skip
    assert all(p["prompt"] == "A?" for p in pairs)
    picked = build_pairs(found, prompts, n=5, per_prompt=2, seed=0)
    assert len(picked) == 2 and all(p in pairs for p in picked)
    assert picked == build_pairs(found, prompts, n=5, per_prompt=2, seed=0)
    assert build_pairs(found, prompts, n=2, per_prompt=None, seed=0) == pairs[:1]  # samples 0, 1 only


def test_example_config_on_hh_harmless_with_pairs(tiny_gpt2: Path, tmp_path: Path) -> None:
    overrides = {"policy": str(tiny_gpt2), "out": str(tmp_path / "r.jsonl"), "limit": 2}
    config = load_generate_config("generate-tiny", overrides)
    config.pairs_out = str(tmp_path / "pairs.parquet")
    result = generate(config, show_progress=False)
    assert (result.prompts, result.written, result.resumed) == (2, 8, 0)
    responses = rows(tmp_path / "r.jsonl")
    assert {r["prompt_id"] for r in responses} == {"hh-harmless-1", "hh-harmless-2"}
    assert all(r["num_tokens"] <= 32 for r in responses)
    pairs = read_pairs(config.pairs_out).records  # what `openrlaif label --pairs` reads
    for prompt_id in ("hh-harmless-1", "hh-harmless-2"):
        texts = {r["response"] for r in responses if r["prompt_id"] == prompt_id and r["response"]}
        mine = [p for p in pairs if p.id.startswith(prompt_id + "-")]
        assert len(mine) == len(list(itertools.combinations(texts, 2)))
        assert all(p.response_a != p.response_b and {p.response_a, p.response_b} <= texts for p in mine)
    assert result.pairs == len(pairs) > 0


def test_bad_input_and_config_are_one_line_errors(tiny_gpt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "cut\n{"id": 3}\n')
    with pytest.raises(InputError, match=rf"^{bad}:2: malformed JSON"):
        run_cli("--policy", str(tiny_gpt2), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"))
    bad.write_text('{"prompt": "fine"}\n{"id": 3}\n')
    with pytest.raises(InputError, match=rf"^{bad}:2: missing field 'prompt'"):
        run_cli("--policy", str(tiny_gpt2), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"))

    server = {"model": "m", "base_urls": ["http://127.0.0.1:9/v1"]}
    with pytest.raises(ConfigError, match="^command line: set exactly one of `policy`"):
        load_generate_config(None, {"policy": "x", "server": server, "prompts": "p", "out": "o.jsonl"})
    with pytest.raises(ConfigError, match="^command line: out: must be a .jsonl file"):
        load_generate_config(None, {"policy": "x", "prompts": "p", "out": "o.parquet"})
    config_file = tmp_path / "g.yaml"
    config_file.write_text("policy: x\nprompts: p\nout: o.jsonl\ntemprature: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{config_file}: temprature: Extra inputs are not permitted"):
        load_generate_config(str(config_file))

    # Resuming into a file that another policy wrote would mix two policies' samples.
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "mixed.jsonl"
    out.write_text(json.dumps({"id": "p0-0", "policy": "other"}) + "\n")
    with pytest.raises(ConfigError, match="already holds samples from policy 'other'"):
        run_cli("--policy", str(tiny_gpt2), "--prompts", str(prompts), "--out", str(out))


# ---------------------------------------------------------------- server


def server_config(server: OpenAITestServer, tmp_path: Path, out: str, **settings: Any) -> GenerateConfig:
    endpoint = settings.pop("endpoint", "completions")
    concurrency = settings.pop("concurrency", 4)
    return GenerateConfig(
        server={
            "model": server.model_name, "base_urls": [server.url], "endpoint": endpoint, "api_key_env": None,
            "concurrency": concurrency, "backoff_base_s": 0.01, "max_retries": 2, "timeout_s": 20,
        },
        prompts=str(write_prompts(tmp_path / "prompts.jsonl")), out=str(tmp_path / out), max_new_tokens=8,
        **settings,
    )  # fmt: skip


def test_server_mode_with_a_fault(tiny_gpt2: Path, gpt2, tmp_path: Path) -> None:
    with OpenAITestServer(LocalLM(tiny_gpt2, name="tiny-gpt2")) as server:
        server.add_faults("500")
        result = generate(server_config(server, tmp_path, "a.jsonl", num_responses=4), show_progress=False)
        assert result.written == 12 and result.server_stats["retries"] == 1
        got = rows(tmp_path / "a.jsonl")
        assert Counter(r["prompt_id"] for r in got) == {"p0": 4, "p1": 4, "p2": 4}
        assert all(r["policy"] == "tiny-gpt2" and 1 <= r["num_tokens"] <= 8 for r in got)
        posts = server.posts()
        assert len(posts) == 13 and all(p.path == "/v1/completions" for p in posts)
        bodies = [p.body for p in posts]
        assert all(b["temperature"] == 0.9 and b["max_tokens"] == 8 for b in bodies)
        assert len({b["seed"] for b in bodies[1:]}) == 12  # one seed per sample

        # Seeded: the same samples again, whatever the concurrency.
        server.reset()
        generate(
            server_config(server, tmp_path, "b.jsonl", num_responses=4, concurrency=1), show_progress=False
        )
        responses = {r["id"]: r["response"] for r in got}
        assert {r["id"]: r["response"] for r in rows(tmp_path / "b.jsonl")} == responses
        assert len({responses[f"p0-{k}"] for k in range(4)}) > 1

        # Greedy through the server equals greedy in process.
        generate(
            server_config(server, tmp_path, "g.jsonl", num_responses=1, temperature=0), show_progress=False
        )
        model, tokenizer = gpt2
        local = sample(model, tokenizer, PROMPTS, n=1, temperature=0, max_new_tokens=8)
        assert [r["response"] for r in sorted(rows(tmp_path / "g.jsonl"), key=lambda r: r["id"])] == [
            s.response_text for s in local
        ]

        server.fail_all = "503"
        with pytest.raises(
            GenerationError, match=rf"generation server 'tiny-gpt2': .*3 attempt.*{server.url}"
        ):
            generate(server_config(server, tmp_path, "c.jsonl", num_responses=1), show_progress=False)


def test_server_chat_endpoint_sends_turns(tiny_llama: Path, tmp_path: Path) -> None:
    with OpenAITestServer(LocalLM(tiny_llama, name="tiny-llama")) as server:
        config = server_config(server, tmp_path, "chat.jsonl", num_responses=2, endpoint="chat")
        assert generate(config, show_progress=False).written == 6
        posts = server.posts()
        assert {p.path for p in posts} == {"/v1/chat/completions"}
        assert sorted(json.dumps(p.body["messages"]) for p in posts) == sorted(
            json.dumps(to_messages(p)) for p in PROMPTS for _ in range(2)
        )
        assert Counter(r["prompt_id"] for r in rows(tmp_path / "chat.jsonl")) == {"p0": 2, "p1": 2, "p2": 2}


def test_generate_is_a_cli_command(tiny_gpt2: Path, tmp_path: Path) -> None:
    from openrlaif.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "Hello there"}\n{"id": "p2", "prompt": "How are you?"}\n')
    out = tmp_path / "responses.jsonl"
    args = ["generate", "--policy", str(tiny_gpt2), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "-n", "3", "--max-new-tokens", "6", "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["p1-0", "p1-1", "p1-2", "p2-0", "p2-1", "p2-2"]
    assert all(r["num_tokens"] <= 6 for r in rows)


def test_generate_set_overrides_reach_nested_settings_and_bad_items_are_one_line(tmp_path):
    config = load_generate_config(
        "generate-tiny", {"out": str(tmp_path / "r.jsonl")}, {"temperature": 0.5, "num_responses": 3}
    )
    assert (config.temperature, config.num_responses) == (0.5, 3)
    with pytest.raises(ConfigError, match=r"temperature: Input should be greater than or equal to 0"):
        load_generate_config("generate-tiny", {"out": str(tmp_path / "r.jsonl")}, {"temperature": -1})
    with pytest.raises(ConfigError, match=r"--set 'temperature': expected KEY=VALUE"):
        run_cli("--config", "generate-tiny", "--out", str(tmp_path / "r.jsonl"), "--set", "temperature")

"""Conversational data (TRL's message lists) through every reader: label and align keep the
format, the trainers, generate and eval take it, the chat template renders the real roles, and bad
rows are one line naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from scripted_judge import ScriptedJudge

from openrlaif.cli import main
from openrlaif.data.chat import encode_prompt, encode_prompt_completions, prompt_text, to_messages
from openrlaif.data.examples import parse_preference_row, parse_sft_row
from openrlaif.data.io import read_pairs, read_prompts, read_records, read_responses
from openrlaif.data.records import Message
from openrlaif.data.refs import demonstration_rows, pair_rows, prompt_records, prompt_rows
from openrlaif.errors import InputError
from openrlaif.evaluation.evaluate import EvalSettings, evaluate
from openrlaif.generation import GenerateConfig, generate
from openrlaif.models.loading import load_tokenizer
from openrlaif.training import DPOConfig, RewardConfig, SFTConfig, train_dpo, train_reward_model, train_sft

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


ANIMALS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack"}


def conversation(animal: str) -> list[dict[str, str]]:
    """A prompt with a system message and an earlier exchange."""
    return [SYSTEM, user("Hi!"), assistant("Hello."), user(f"What does the {animal} say?")]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- every accepted shape


def test_every_reader_takes_each_format_and_writes_it_back(tmp_path: Path) -> None:
    prompt = conversation("cow")
    as_tuple = tuple(Message(**m) for m in prompt)
    pairs = read_pairs(write_rows(tmp_path / "pairs.jsonl", [
        {"id": "ab", "prompt": prompt, "response_a": [assistant("Moo.")], "response_b": [assistant("Woof.")],
         "preferred": "a"},
        {"id": "explicit", "prompt": prompt, "chosen": [assistant("Moo.")], "rejected": [assistant("Woof.")]},
        {"id": "implicit", "chosen": [*prompt, assistant("Moo.")], "rejected": [*prompt, assistant("Woof.")]},
        {"id": "hh", "chosen": "\n\nHuman: hi\n\nAssistant: hello!", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
        {"id": "text", "prompt": "q", "chosen": "good", "rejected": "bad"},
    ])).records  # fmt: skip
    for pair in pairs[:3]:
        assert (pair.prompt, pair.response_a, pair.response_b, pair.human_label) == (
            as_tuple,
            "Moo.",
            "Woof.",
            1.0,
        )
    assert (pairs[3].prompt, pairs[3].response_a) == ("\n\nHuman: hi\n\nAssistant:", "hello!")  # HH: text
    assert pairs[4].to_dict()["response_a"] == "good"
    assert pairs[0].to_dict() == {"id": "ab", "prompt": prompt, "response_a": [assistant("Moo.")],
                                  "response_b": [assistant("Woof.")], "human_label": 1.0}  # fmt: skip

    sft = read_records(write_rows(tmp_path / "sft.jsonl", [
        {"id": "m", "messages": [*prompt, assistant("Moo.")]},
        {"id": "pc", "prompt": prompt, "completion": [assistant("Moo.")]},
        {"id": "t", "prompt": "q", "completion": "a"},
    ]), parse_sft_row).records  # fmt: skip
    assert [(x.prompt, x.completion) for x in sft] == [(as_tuple, "Moo."), (as_tuple, "Moo."), ("q", "a")]

    labeled = {"id": "l", "prompt": prompt, "response_a": [assistant("Woof.")], "response_b": [assistant("Moo.")],
               "chosen": [assistant("Moo.")], "rejected": [assistant("Woof.")], "p_chosen": 0.8, "human_label": 0.0}  # fmt: skip
    example = parse_preference_row(labeled, 1)
    assert (example.prompt, example.chosen, example.rejected, example.p, example.human) == (
        as_tuple, "Moo.", "Woof.", 0.8, 1.0)  # fmt: skip

    prompts_file = write_rows(
        tmp_path / "prompts.jsonl", [{"id": "p", "prompt": prompt}, {"id": "t", "prompt": "q"}]
    )
    assert [p.prompt for p in read_prompts(prompts_file).records] == [as_tuple, "q"]
    response_row = {"id": "r", "prompt": prompt, "response": [assistant("Moo.")]}
    assert (
        read_responses(write_rows(tmp_path / "r.jsonl", [response_row])).records[0].to_dict() == response_row
    )

    # the pipeline's data references read files as the commands do and write rows in their format
    assert prompt_rows(str(prompts_file), None, "x") == read_rows(prompts_file)
    assert demonstration_rows(str(tmp_path / "sft.jsonl[1:2]"), None, "x") == [
        {"id": "pc", "prompt": prompt, "completion": [assistant("Moo.")]}
    ]
    assert pair_rows(str(tmp_path / "pairs.jsonl"), 1, "x") == [pairs[0].to_dict()]


# ---------------------------------------------------------------- one-line errors

BAD_ROWS = [
    ({"prompt": [{"role": "bot", "content": "hi"}], "response": [assistant("a")]},
     "field 'prompt', message 1: unknown role 'bot' (roles: system, user, assistant)"),
    ({"prompt": [SYSTEM, user("  ")], "response": [assistant("a")]}, "field 'prompt', message 2: 'content' is empty"),
    ({"prompt": [user("hi")], "response": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
     "field 'response', message 1: 'content' must be a string, got list"),
    ({"prompt": [user("hi")], "response": [user("a")]},
     "field 'response' must be a list of one assistant message, got [user]"),
    ({"prompt": [user("hi")], "response": "a"},
     'field \'response\' is text but the prompt is a list of messages; give it as [{"role": "assistant", "content": ...}]'),
    ({"prompt": "hi", "response": [assistant("a")]},
     "field 'response' is a list of messages but the prompt is text; give both in one format"),
    ({"prompt": ["hi"], "response": [assistant("a")]}, "field 'prompt', message 1: expected a {role, content} object, got str"),
    ({"prompt": [], "response": [assistant("a")]}, "field 'prompt' is an empty list of messages"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_messages_are_one_line_naming_file_line_and_field(
    tmp_path: Path, row: dict[str, Any], message: str
) -> None:
    path = write_rows(tmp_path / "r.jsonl", [{"prompt": [user("ok")], "response": [assistant("ok")]}, row])
    with pytest.raises(InputError) as info:
        read_responses(path)
    assert str(info.value) == f"{path}:2: {message}"


def test_bad_preference_and_sft_rows_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = conversation("cow")
    pairs = write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": prompt, "chosen": [assistant("Moo.")], "rejected": [assistant("Woof.")]},
        {"prompt": prompt, "chosen": [assistant("Moo."), assistant("Moo!")], "rejected": [assistant("Woof.")]},
    ])  # fmt: skip
    code = main(["label", "--pairs", str(pairs), "--out", str(tmp_path / "out.jsonl"), "--quiet"])
    wrong = "field 'chosen' must be a list of one assistant message, got [assistant, assistant]"
    assert (code, capsys.readouterr().err) == (2, f"error: {pairs}:2: {wrong}\n")
    implicit = write_rows(tmp_path / "implicit.jsonl", [
        {"chosen": [*prompt, assistant("Moo.")], "rejected": [*conversation("dog"), assistant("Woof.")]},
    ])  # fmt: skip
    with pytest.raises(InputError) as info:
        read_pairs(implicit)
    assert (
        str(info.value)
        == f"{implicit}:1: 'chosen' and 'rejected' conversations differ before their last message"
    )
    sft = write_rows(tmp_path / "sft.jsonl", [{"messages": prompt}])
    with pytest.raises(InputError) as info:
        read_records(sft, parse_sft_row)
    last = "the last message must be the assistant's reply, not 'user'"
    assert str(info.value) == f"{sft}:1: field 'messages': {last}"


# ---------------------------------------------------------------- rendering


def test_the_chat_template_renders_the_real_roles(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    messages = conversation("cow")
    prompt = tuple(Message(**m) for m in messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|system|>\nYou answer in one short sentence.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n"
        "<|user|>\nWhat does the cow say?</s>\n<|assistant|>\n"
    )
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, prompt, chat=True) == expected  # generate, RL
    [(ids, n_prompt)] = encode_prompt_completions(
        tokenizer, [prompt], ["Moo."], 512, True, chat=True
    )  # trainers
    completion = tokenizer("Moo.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert (ids[:n_prompt], ids[n_prompt:]) == (expected, completion)
    # without a chat template, and for judges: the HH-RLHF dialogue
    text = (
        "\n\nSystem: You answer in one short sentence.\n\nHuman: Hi!\n\nAssistant: Hello."
        "\n\nHuman: What does the cow say?\n\nAssistant:"
    )
    assert prompt_text(prompt) == text
    assert encode_prompt(tokenizer, prompt, chat=False) == tokenizer(text)["input_ids"]
    assert to_messages(prompt_text(prompt[1:])) == messages[1:]
    judge = ScriptedJudge()
    judge.compare(prompt, "Moo.", "Woof.")
    judge.score(prompt, "Moo.")
    assert {c.prompt for c in judge.order_calls} | {p for p, _ in judge.score_calls} == {text}


# ---------------------------------------------------------------- the commands end to end


@pytest.fixture(scope="module")
def judge_config(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("judge") / "judge.yaml"
    path.write_text(
        yaml.safe_dump({"backend": "hf", "model": str(tiny_llama), "device": "cpu"}), encoding="utf-8"
    )
    return path


def preference_rows(n: int) -> list[dict[str, Any]]:
    """Conversational preference rows in TRL's three shapes, and one text row."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        animal = list(ANIMALS)[i % len(ANIMALS)]
        good, bad = f"The {animal} says {ANIMALS[animal]}.", "I do not know."
        prompt = conversation(animal) if i % 2 else [user(f"What does the {animal} say, {i}?")]
        if i % 3 == 0:
            rows.append(
                {"id": f"r{i}", "prompt": prompt, "chosen": [assistant(good)], "rejected": [assistant(bad)]}
            )
        elif i % 3 == 1:
            rows.append(
                {"id": f"r{i}", "chosen": [*prompt, assistant(good)], "rejected": [*prompt, assistant(bad)]}
            )
        else:
            rows.append({"id": f"r{i}", "prompt": prompt, "response_a": [assistant(bad)],
                         "response_b": [assistant(good)], "preferred": "b"})  # fmt: skip
    return rows


def test_label_and_align_keep_the_format(
    judge_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        *preference_rows(5),
        {"id": "text", "prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "hello", "rejected": "go"},
    ]
    pairs = write_rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "labeled.jsonl"
    args = ["--judge", str(judge_config), "--quiet"]
    assert main(["label", "--pairs", str(pairs), "--out", str(out), *args]) == 0
    labeled = {r["id"]: r for r in read_rows(out)}
    for row in rows[:5]:
        prompt = row["prompt"] if "prompt" in row else row["chosen"][:-1]
        got = labeled[row["id"]]
        assert got["prompt"] == prompt
        assert {json.dumps(got[k]) for k in ("chosen", "rejected")} == {
            json.dumps(got[k]) for k in ("response_a", "response_b")
        }
        for key in ("response_a", "response_b", "chosen", "rejected"):
            assert len(got[key]) == 1 and got[key][0]["role"] == "assistant", key
    assert (labeled["text"]["prompt"], labeled["text"]["response_a"]) == (
        rows[5]["prompt"],
        "hello",
    )  # text: text

    capsys.readouterr()
    align = tmp_path / "align.json"
    labels = tmp_path / "align.labels.jsonl"
    assert (
        main(["align", "--dataset", str(pairs), "--out", str(align), "--labels-out", str(labels), *args]) == 0
    )
    assert json.loads(align.read_text())["pairs"] == 6
    assert read_rows(labels)[0]["prompt"] == rows[0]["prompt"]

    # people label a conversational file in a spreadsheet: the cells show the dialogue as text,
    # and the filled-in file goes back in (the texts checked against the labeled file's messages)
    import csv

    from openrlaif.evaluation.human import export_uncertain, import_labels

    export_uncertain(out, tmp_path / "to_label.csv", n=6)
    with open(tmp_path / "to_label.csv", encoding="utf-8-sig", newline="") as fh:
        cells = list(csv.DictReader(fh))
    conversational = next(c for c in cells if c["id"] != "text")
    assert conversational["prompt"].startswith("\n\nSystem: You answer in one short sentence.\n\nHuman: Hi!")
    assert conversational["response_a"] == labeled[conversational["id"]]["response_a"][0]["content"]
    for cell in cells:
        cell["human_label"] = "A"
    with open(tmp_path / "filled.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    result = import_labels(out, tmp_path / "filled.csv", tmp_path / "human.jsonl")
    assert result.human == 6
    merged = {r["id"]: r for r in read_rows(tmp_path / "human.jsonl")}
    assert merged[conversational["id"]]["prompt"] == labeled[conversational["id"]]["prompt"]  # still messages


def test_train_sft_rm_dpo_on_conversational_files(tiny_llama: Path, tmp_path: Path) -> None:
    sft_data = write_rows(tmp_path / "sft.jsonl", [
        {"id": f"s{i}", "messages": [*conversation(a), assistant(f"The {a} says {s}.")]}
        if i % 2 else {"id": f"s{i}", "prompt": conversation(a), "completion": [assistant(f"The {a} says {s}.")]}
        for i, (a, s) in enumerate(ANIMALS.items())
    ])  # fmt: skip
    pref_data = write_rows(tmp_path / "pref.jsonl", preference_rows(4))
    shared = {"model": str(tiny_llama), "max_steps": 1, "batch_size": 2, "eval_fraction": 0.0, "eval_every": 0,
              "save_every": 1, "report_to": [], "mixed_precision": "no"}  # fmt: skip
    sft = train_sft(
        SFTConfig(data=str(sft_data), output_dir=str(tmp_path / "sft"), **shared), show_progress=False
    )
    rm = train_reward_model(
        RewardConfig(data=str(pref_data), output_dir=str(tmp_path / "rm"), **shared), show_progress=False
    )
    dpo = train_dpo(
        DPOConfig(data=str(pref_data), output_dir=str(tmp_path / "dpo"), **shared), show_progress=False
    )
    assert (sft.steps, rm.steps, dpo.steps) == (1, 1, 1)


def test_generate_and_eval_on_conversational_prompts(tiny_llama: Path, tmp_path: Path) -> None:
    prompts = write_rows(tmp_path / "prompts.jsonl", [
        {"id": a, "prompt": conversation(a)} for a in ANIMALS
    ] + [{"id": "text", "prompt": "\n\nHuman: hi\n\nAssistant:"}])  # fmt: skip
    out = tmp_path / "responses.jsonl"
    config = GenerateConfig(policy=str(tiny_llama), prompts=str(prompts), num_responses=2, max_new_tokens=4,
                            device="cpu", out=str(out), pairs_out=str(tmp_path / "pairs.jsonl"))  # fmt: skip
    generate(config, show_progress=False)
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["cow-0"]["prompt"] == conversation("cow")
    assert [m["role"] for m in rows["cow-0"]["response"]] == ["assistant"]
    assert isinstance(rows["text-1"]["response"], str)
    for pair in read_pairs(
        tmp_path / "pairs.jsonl"
    ).records:  # ready for `openrlaif label`, in the prompts' format
        assert isinstance(pair.prompt, str) == (pair.id.startswith("text"))

    records = prompt_records(str(prompts))
    settings = EvalSettings(max_new_tokens=4, device="cpu")
    summary = evaluate(tiny_llama, out, records, ScriptedJudge(), tmp_path / "eval", settings=settings,
                       show_progress=False)  # fmt: skip
    assert summary["prompts"] == 5
    samples = {r["id"]: r for r in read_rows(tmp_path / "eval" / "samples.jsonl")}
    assert samples["dog"]["prompt"] == conversation("dog")
    assert read_rows(tmp_path / "eval" / "prompts.jsonl")[0] == {"id": "cow", "prompt": conversation("cow")}


def test_rl_samples_judges_and_keeps_anchors_of_conversational_prompts(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """GRPO against an anchor on conversational prompts: the policy samples from the chat
    template's rendering, the judge reads the conversation as text (`prompt_text`), the anchors
    file keeps the conversation, and the canaries (the echo of the user's last turn) run."""
    from openrlaif.training import RLConfig, train_rl

    prompts = write_rows(tmp_path / "prompts.jsonl", [{"id": a, "prompt": conversation(a)} for a in ANIMALS])
    judge = ScriptedJudge(keyword="o")
    config = RLConfig(
        model=str(tiny_llama), data=str(prompts), output_dir=str(tmp_path / "rl"), algorithm="grpo",
        reward={"type": "judge_pairwise", "judge": "unused", "comparisons": "anchor"}, num_samples=2,
        batch_size=2, max_new_tokens=4, max_steps=2, save_every=2, report_to=[], mixed_precision="no",
        canary_every=1,
    )  # fmt: skip
    result = train_rl(config, show_progress=False, judge=judge)
    assert result.steps == 2
    judged = {call.prompt for call in judge.order_calls}
    assert judged <= {prompt_text(tuple(Message(**m) for m in conversation(a))) for a in ANIMALS}
    assert judged and all(p.startswith("\n\nSystem: You answer") for p in judged)
    anchors = read_rows(next((tmp_path / "rl").glob("anchors.rank*.jsonl")))
    assert {row["id"] for row in anchors} == set(ANIMALS) and all(
        row["prompt"] == conversation(row["id"]) for row in anchors
    )
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/reward_mean" in r] == [1, 2]
    assert all("canary/echo" in r for r in rows if "train/reward_mean" in r)

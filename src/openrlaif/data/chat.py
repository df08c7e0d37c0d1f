"""Prompt and completion encoding: the one place that decides how a prompt (text, or a
conversation: `data/records.py`'s `Prompt`) becomes the tokens a policy sees, or the text a judge reads.

- `use_chat_template`: the one chat-template decision ("auto": the tokenizer's template when it
  has one; "on" without one is an error; "off": plain text), taken by generation, RL rollouts,
  the trainers and the HF judge alike.
- `to_messages` / `encode_prompt`: a prompt as chat messages (a conversation's own, roles and
  system message included; an HH-RLHF dialogue becomes its turns) and its token ids, exactly as
  `generate` and RL feed the policy.
- `prompt_text`: a prompt as one text, for whatever reads text (judges, text-only servers, a
  policy without a chat template): a conversation becomes an HH-RLHF dialogue.
- `encode_prompts` / `completion_text` / `encode_prompt_completions` / `encoded_lengths`: prompt
  + completion pairs for the trainers (SFT, reward model, DPO), the prompt encoded as above.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from openrlaif.data.records import Prompt
from openrlaif.errors import ConfigError

ChatTemplate = Literal["auto", "on", "off"]  # "auto": the chat template when the tokenizer has one

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


POLICY_WITHOUT_TEMPLATE = "chat_template is 'on' but the policy's tokenizer has none; set it to auto or off"


def use_chat_template(tokenizer: Any, setting: str, missing: str = POLICY_WITHOUT_TEMPLATE) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template. `missing` is the one-line
    error for "on" with a tokenizer that has none (callers other than a policy name their setting)."""
    has_one = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has_one:
        raise ConfigError(missing)
    return has_one and setting != "off"


def to_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages for a prompt: a conversation's messages as they are; an HH-RLHF dialogue
    ("\\n\\nHuman: ... \\n\\nAssistant:") becomes its turns, so a chat model sees a real
    conversation; any other text is one user message."""
    if not isinstance(prompt, str):
        return [{"role": m.role, "content": m.content} for m in prompt]
    parts = _TURN.split(prompt)  # [before, role, text, role, text, ...]
    roles = parts[1::2]
    if len(roles) >= 2 and not parts[0].strip() and roles[-1] == "Assistant" and not parts[-1].strip():
        names = {"Human": "user", "Assistant": "assistant"}
        return [
            {"role": names[r], "content": t.strip()} for r, t in zip(roles[:-1], parts[2:-2:2], strict=True)
        ]
    return [{"role": "user", "content": prompt.strip()}]


# The speakers of `prompt_text`: HH-RLHF's, which the shipped data, base policy and judge
# templates ("a conversation between a human and an AI assistant") use
SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one text: text as it is; a conversation as an HH-RLHF dialogue, each message
    "\\n\\n<Speaker>: <content>" (System, Human, Assistant), ending with "\\n\\nAssistant:" like an
    HH-RLHF prompt (without a system message, `to_messages` turns it back into the same messages).
    Judges read a conversation so (their templates rate "a conversation between a human and an AI
    assistant"), and so does a policy without a chat template (as the shipped base policy, which
    was trained on HH-RLHF dialogues)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"\n\n{SPEAKERS[m.role]}: {m.content.strip()}" for m in prompt) + "\n\nAssistant:"


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """A prompt's token ids as the policy sees it: the text (`prompt_text`) with the tokenizer's
    special tokens (e.g. BOS), or the chat template's rendering of its messages plus the
    generation prompt."""
    if chat:
        text = tokenizer.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has its own
    return list(tokenizer(prompt_text(prompt))["input_ids"])


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat: bool) -> list[list[int]]:
    """`encode_prompt` of each prompt (plain text in one batched call; chat prompts once each)."""
    if not chat:  # one batched call; the same ids as encode_prompt(tokenizer, prompt, False)
        texts = [prompt_text(p) for p in prompts]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    encoded: dict[Prompt, list[int]] = {}  # DPO and RM pass every prompt twice
    for prompt in prompts:
        if prompt not in encoded:
            encoded[prompt] = encode_prompt(tokenizer, prompt, True)
    return [list(encoded[prompt]) for prompt in prompts]


def completion_text(prompt: Prompt, completion: str, chat: bool = False) -> str:
    """The completion as it follows the prompt. Plain text: a space is put between them unless one
    is there (HH-RLHF replies follow `Assistant:`; TRL-style completions usually bring their own).
    Chat: the completion starts the assistant turn right after the generation prompt, without
    leading whitespace, as templates render a message's content and as `generate` stores replies."""
    if chat:
        return completion.lstrip()
    if not completion or prompt_text(prompt)[-1:].isspace() or completion[:1].isspace():
        return completion
    return " " + completion


def encode_prompt_completions(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    max_length: int,
    append_eos: bool,
    chat: bool = False,
) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion and the number of prompt tokens, for each pair.

    Prompt and completion are tokenized separately, the prompt as the policy sees it when it
    generates (`encode_prompts`; with `chat`, rendered by the chat template). Too long: the
    completion keeps at least half of `max_length` and is cut at its end; the prompt is cut from
    the left (after its BOS), so the text nearest the completion stays.
    """
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    texts = [completion_text(p, c, chat) for p, c in zip(prompts, completions, strict=True)]
    completion_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # the token a tokenizer puts first (GPT/Llama BOS, BERT [CLS], which a classifier reads) stays
    starts = {tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)} - {None}
    out = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        c = c + [tokenizer.eos_token_id] if append_eos else c
        if len(p) + len(c) > max_length:
            c = c[: max(max_length - len(p), max_length // 2)]
            room = max_length - len(c)
            head = p[:1] if p[:1] and p[0] in starts else []
            p = head + p[len(p) - (room - len(head)) :] if len(p) > room else p
        out.append((p + c, len(p)))
    return out


def encoded_lengths(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    completions: Sequence[str],
    max_length: int,
    append_eos: bool,
    chat: bool = False,
    chunk: int = 1024,
) -> list[int]:
    """Tokens of each prompt + completion as `encode_prompt_completions` encodes them (for
    length-grouped batches), tokenized in chunks so a large dataset is never held as ids."""
    out: list[int] = []
    for start in range(0, len(prompts), chunk):
        encoded = encode_prompt_completions(
            tokenizer, prompts[start : start + chunk], completions[start : start + chunk], max_length, append_eos, chat
        )  # fmt: skip
        out += [len(ids) for ids, _ in encoded]
    return out


def resolve_chat_template(tokenizer: Any, setting: str, model: str) -> bool:
    """The trainers' `chat_template` setting (SFT, reward model, DPO, RL's reward model scoring):
    `use_chat_template` with an error naming the model."""
    return use_chat_template(
        tokenizer,
        setting,
        f"chat_template: 'on' but the tokenizer of {model!r} has no chat template; set chat_template: auto or off",
    )

"""Guards against a policy that learns to game its reward source ("One Token to Fool
LLM-as-a-Judge", arXiv 2507.08794; longer answers that judges like).

- Length: `length_penalty` λ subtracts λ·(tokens / max_new_tokens) from each reward;
  `length_controlled` replaces each reward by its residual after a least-squares fit on length
  over the step's batch (r - slope·(len - mean len)), the length-controlled win rate's idea
  applied to the reward: what length explains is taken out.
- Canaries: fixed degenerate responses (below) scored by the reward source on the step's prompts,
  the first step (the initial policy) and every `canary_every` steps. A canary whose mean reward
  is above the median reward of the policy's own samples that step means the reward source
  prefers junk: a warning, `canary/*` metrics, and with `canary_action: stop` the run stops.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from openrlaif.data.chat import to_messages
from openrlaif.data.records import Prompt

# name -> the canary response to a prompt
CANARIES: dict[str, Callable[[Prompt], str]] = {
    "empty": lambda prompt: "",
    "echo": lambda prompt: to_messages(prompt)[-1]["content"],  # the user's last turn repeated
    "format_token": lambda prompt: "Thought process:",  # the "master key" opener of arXiv 2507.08794
    "refusal": lambda prompt: "I'm sorry, but I can't help with that.",
    "repetition": lambda prompt: " ".join(["I agree."] * 40),
}


def length_adjusted(scores: torch.Tensor, lengths: torch.Tensor, penalty: float, controlled: bool,
                    max_new_tokens: int) -> torch.Tensor:  # fmt: skip
    """The rewards RL trains on, after the length guards (unchanged with both off)."""
    lengths = lengths.to(scores.dtype)
    if controlled and len(scores) > 1:
        centred = lengths - lengths.mean()
        spread = (centred**2).sum()
        if spread > 0:
            slope = (centred * (scores - scores.mean())).sum() / spread
            scores = scores - slope * centred
    if penalty:
        scores = scores - penalty * lengths / max_new_tokens
    return scores


def canary_texts(prompts: Sequence[Prompt]) -> dict[str, list[str]]:
    """Each canary's response to each prompt."""
    return {name: [make(p) for p in prompts] for name, make in CANARIES.items()}


def canaries_above(canary_means: dict[str, float], sample_rewards: Sequence[float]) -> list[str]:
    """The canaries whose mean reward is above the median reward of the policy's samples."""
    median = statistics.median(sample_rewards)
    return [name for name, value in canary_means.items() if value > median]


def canary_means(
    score_alone: Callable[[list[Prompt], list[str], list[list[str]], list[str] | None], list[float]],
    prompts: list[Prompt], groups: list[list[str]], anchors: list[str] | None,
) -> dict[str, float]:  # fmt: skip
    """Each canary's mean reward over `prompts` (one per group of samples), scored as the policy's
    samples are (`Rewarder.score_alone`), every canary in one call (one batch for the judge)."""
    texts = canary_texts(prompts)
    n = len(prompts)
    values = score_alone(
        prompts * len(texts), [t for name in texts for t in texts[name]], groups * len(texts),
        anchors * len(texts) if anchors is not None else None,
    )  # fmt: skip
    return {name: sum(values[i * n : (i + 1) * n]) / n for i, name in enumerate(texts)}


def canary_due(every: int, step: int, start_step: int) -> bool:
    """The first step of a fresh run (the initial policy) and every `every` steps; 0: never."""
    return every > 0 and ((step == 1 and start_step == 0) or step % every == 0)

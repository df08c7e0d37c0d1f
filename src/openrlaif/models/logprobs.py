"""Log-probabilities of tokens under a causal LM: the SFT loss, DPO, RL and the judge read them.

- `IGNORE_INDEX`: the label of tokens that carry no log-prob (prompt, padding), as in Hugging Face.
- `token_logprobs`: log p(label) at each position, in float32.
- `sequence_logprobs`: the summed log-probs of each sequence's labeled tokens.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding), as in Hugging Face models


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at each position (logits (B, T, V) aligned with labels (B, T)); 0 where the
    label is IGNORE_INDEX. In float32: logsumexp in bf16 loses too much for a loss."""
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logits = logits.float()
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def sequence_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the labeled tokens of each sequence, and their count: (B,), (B,).

    `labels` is `input_ids` with IGNORE_INDEX where no log-prob is wanted (prompt, padding).
    Position t predicts token t+1, so logits and labels are shifted by one.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    logp = token_logprobs(logits[:, :-1], targets)
    return logp.sum(-1), (targets != IGNORE_INDEX).sum(-1)

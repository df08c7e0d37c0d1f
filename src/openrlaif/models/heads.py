"""Value heads: a causal LM's transformer body with a scalar head.

- `ValueHeadModel`: one value per sequence, read at its last attended token (the reward model's
  `causal_lm_value_head` type).
- `TokenValueModel`: one value at every position, V(s_t) for each state of a response (RL's value
  model for REINFORCE with a baseline and PPO).

Both save as the body's Hugging Face folder plus `value_head.safetensors`, so either loads the
other's folder, and the body folder also loads alone with `AutoModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from openrlaif.models.loading import load_pretrained

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class RewardOutput:
    logits: torch.Tensor  # (B, 1), like a sequence-classification model's output


class ValueHeadModel(nn.Module):
    """A causal LM's transformer body (no LM head) with a scalar head on its last hidden state.

    Saved as the body's HF folder plus `value_head.safetensors`; the body folder also loads
    alone with `AutoModel`, so an RL value model can start from it.
    """

    def __init__(self, body: Any) -> None:  # a transformers model without its LM head
        super().__init__()
        self.body = body
        self.config = body.config
        # the body's transformer blocks: FSDP shards (and gathers) the model one block at a time
        self._no_split_modules = list(getattr(body, "_no_split_modules", None) or [])
        self.value_head = nn.Linear(body.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=getattr(body.config, "initializer_range", 0.02))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> RewardOutput:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask).argmax(-1)  # the last attended token, left or right padding
        picked = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        return RewardOutput(logits=self.value_head(picked))

    def save_pretrained(
        self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        state_dict = self.state_dict() if state_dict is None else state_dict
        body = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
        self.body.save_pretrained(directory, state_dict=body)
        head = {
            k.removeprefix("value_head."): v.contiguous()
            for k, v in state_dict.items()
            if k.startswith("value_head.")
        }
        save_file(head, str(Path(directory) / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(
        cls, path: str, revision: str | None = None, trust_remote_code: bool = False
    ) -> ValueHeadModel:
        """From a causal LM (a new head) or from a folder this class saved (its head)."""
        from transformers import AutoModel  # why: transformers is slow to import

        model = cls(load_pretrained(AutoModel, path, revision, trust_remote_code))
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.exists():
            model.value_head.load_state_dict(load_file(str(head_file)))
        return model


class TokenValueModel(ValueHeadModel):
    """`ValueHeadModel` (same folder format) with a value at every position rather than at the
    last token only: V(s_t) for each state of the response."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1)

"""Reusing keys and values across forward passes: a shared prompt prefix encoded once.

- `forward_parameters` / `accepts_logits_to_keep`: what the model's forward takes, looked up
  through DDP and peft wrappers (a `PeftModel`'s forward takes **kwargs and passes them on).
- `cache_argument` / `output_cache`: transformers 5.24 renamed the forward's `past_key_values`
  to `cache` (the old name is deprecated until 5.40); both spellings are handled here, once.
- `attention_layout`: what kind of attention each layer has. Plain causal layers and
  sliding-window layers (Gemma 2/3, Mistral, Qwen2 with `use_sliding_window`) can reuse a cache
  exactly; anything else (chunked, linear or recurrent layers) cannot, and callers fall back to
  full passes.
- `position_masks`: the attention masks of a forward pass over cached rows, built from the true
  token positions rather than from the cache's slot indices. A batch that pads each row's cached
  part to a common width puts pad slots between a row's tokens: a sliding window measured in
  slots would then reach less far back than the model's window measured in tokens. These masks
  measure it in tokens, so reuse gives the same numbers as a plain pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def forward_parameters(model: Any) -> set[str]:
    """The names the underlying transformers model's forward takes; looks through a DDP wrapper
    and a peft model (whose forward takes **kwargs and passes them on)."""
    inner = getattr(model, "module", model)  # DDP wraps the model
    if callable(getattr(type(inner), "get_base_model", None)):  # a peft `PeftModel` (LoRA)
        inner = inner.get_base_model()
    return set(inspect.signature(inner.forward).parameters)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (the LM head then runs on the last
    positions only)."""
    return "logits_to_keep" in forward_parameters(model)


def cache_argument(model: Any) -> str:
    """The name of the model forward's key/value cache argument in this transformers version."""
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass(frozen=True)
class AttentionLayout:
    """The attention kinds of a model's layers: `windows` maps each kind present ("full_attention",
    "sliding_attention") to its window in tokens (None: unlimited). `reusable` is False for a model
    with layers of any other kind. `needs_masks`: masks must be passed per kind (a sliding layer)."""

    windows: dict[str, int | None]
    reusable: bool

    @property
    def needs_masks(self) -> bool:
        return any(w is not None for w in self.windows.values())


def attention_layout(model: Any) -> AttentionLayout:
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is None:  # one kind for every layer: sliding when the model sets a window and uses it
        uses_window = window is not None and getattr(config, "use_sliding_window", True)
        kinds = [SLIDING if uses_window else FULL]
    windows: dict[str, int | None] = {}
    for kind in set(kinds):
        if kind == FULL:
            windows[kind] = None
        elif kind == SLIDING and isinstance(window, int) and window > 0:
            windows[kind] = window
        else:
            return AttentionLayout({}, reusable=False)
    return AttentionLayout(windows, reusable=True)


def position_masks(
    layout: AttentionLayout,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor,
    attention: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """{attention kind: [B, 1, Q, K] mask}: query i sees key j when j is a real token, is not after
    i, and (sliding layers) is fewer than `window` tokens before it. Positions are [B, Q] and
    [B, K]; `key_valid` [B, K] is 1 for real tokens. Boolean masks for SDPA and flex attention,
    additive float masks (0 or the dtype's minimum) for eager attention."""
    import torch  # why: start-up; only callers that run a model get here

    distance = query_positions[:, :, None] - key_positions[:, None, :]
    visible = key_valid[:, None, :].bool() & (distance >= 0)
    masks = {}
    for kind, window in layout.windows.items():
        mask = (visible if window is None else visible & (distance < window))[:, None]
        if attention == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        masks[kind] = mask
    return masks

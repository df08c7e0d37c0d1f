"""Local causal-LM judge (backend "hf"): soft labels from the log-probabilities of label tokens.

Pairwise (RLAIF, DESIGN §2.1): P(Response 1 preferred) = softmax over the probabilities of the
tokens that spell "1" and "2" right after the ending `Preferred Response=`. Direct score
(d-RLAIF, §2.4): the ten score tokens after `SCORE: `, renormalised, give an expected score that is
rescaled to [-1, 1].

Why it is fast:
- one forward pass per item, no `generate` (except for chain-of-thought rationales);
- the prompt is split into a shared prefix (preamble + few-shot exemplars, the same for every item)
  and a per-item suffix. The prefix is encoded once and its KV cache is reused by every batch, so an
  item costs only its own tokens. Prompts are always tokenized as prefix ids + suffix ids, with or
  without the cache, so both paths give the same numbers;
- items with the same context (both orders of a pair, several responses to one prompt) share it
  too: the context is encoded once per group on top of the prefix cache, and each order adds only
  its responses;
- rows are sorted by length, right-padded and batched with little padding; logits are computed
  only at the positions that are read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from openrlaif.config import HFJudgeConfig, answer_fields
from openrlaif.data.chat import use_chat_template
from openrlaif.errors import ConfigError
from openrlaif.judges.base import (
    Judge,
    OrderedPair,
    OrderJudgment,
    ScoreJudgment,
    expected_score_to_unit,
)
from openrlaif.judges.prompts import load_judge_templates
from openrlaif.judges.tokens import (
    encode_continuations,
    pair_label_ids,
    pair_probability,
    score_label_tokens,
    score_log_distribution,
)
from openrlaif.models.kv import (
    accepts_logits_to_keep,
    attention_layout,
    cache_argument,
    output_cache,
    position_masks,
)
from openrlaif.models.loading import load_causal_lm, local_weights_stamp, resolve_device
from openrlaif.models.logprobs import HeadInput, lm_forward
from openrlaif.models.precision import choose_precision

logger = logging.getLogger(__name__)

# Marks where the per-item text goes when the chat template is rendered once for the shared prefix,
# and where the context sits inside a formatted sample (to cut long contexts from the left).
_SENTINEL = "\u2063OPENRLAIF-ITEM\u2063"
_CONTEXT_MARK = "\u2063OPENRLAIF-CONTEXT\u2063"
# Padding allowed in a batch, as a share of its real tokens. On a CPU every token costs compute,
# padding included, and bigger batches gain almost nothing (measured: batches of 2 rows ran as fast
# as 32), so padding is kept small; on a GPU a fuller batch is worth more padding.
_PAD_TOLERANCE_CPU = 0.1
_PAD_TOLERANCE_GPU = 0.5
_MIN_SUFFIX_TOKENS = 32  # room a prompt must leave after the shared prefix
_DECODING_FIELDS = ("cot", "self_consistency", "temperature", "max_rationale_tokens", "seed")
_UNLIMITED = 1_000_000_000

# One item's suffix text in three parts: (before the context, the context, after the context).
# Only the middle part is cut when a prompt is too long.
Pieces = tuple[str, str, str]


def _split_at_context(sample_format: str, fields: dict[str, str], after: str) -> Pieces:
    """Split `sample_format.format(**fields) + after` around the context field."""
    sample = sample_format.format(**fields)
    marked = sample_format.format(**{**fields, "context": _CONTEXT_MARK})
    if _CONTEXT_MARK not in marked:  # a template without a context: nothing to cut but the rest
        return "", "", sample + after
    start = marked.index(_CONTEXT_MARK)
    end = start + len(fields["context"])
    return sample[:start], sample[start:end], sample[end:] + after


class HFJudge(Judge):
    backend = "hf"

    def __init__(self, config: HFJudgeConfig) -> None:
        super().__init__()
        self.config = config
        self.templates = load_judge_templates(
            config.template, config.principles, config.principles_per_judgment, config.seed
        )
        self.device = resolve_device(config.device)
        self.precision = choose_precision(config.dtype, self.device)  # the weights' dtype
        self.dtype = self.precision.dtype
        self.tokenizer, self.model = self._load()
        self.truncated = 0  # items whose prompt was cut to fit max_length, over the judge's life
        self.use_chat = self._resolve_chat_template()
        self.max_length = self._resolve_max_length()
        self._weights_stamp = local_weights_stamp(config.model)
        self._commit = getattr(self.model.config, "_commit_hash", None)  # pins hub models exactly
        self._pad_id = next(
            (i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0
        )
        self._keeps_logits = accepts_logits_to_keep(self.model)
        self._layout = attention_layout(self.model)
        self._cache_arg = cache_argument(self.model)

        pair, score = self.templates.pairwise, self.templates.score
        # Shared prefix per kind: its ids, and (with a chat template) the text that closes the user
        # turn and opens the assistant's, which goes between the sample and the ending.
        self._prefix_ids: dict[str, list[int]] = {}
        self._chat_tail: dict[str, str] = {}
        for kind, prefix in (("pair", pair.prefix()), ("score", score.prefix())):
            self._prefix_ids[kind], self._chat_tail[kind] = self._encode_prefix(prefix)
            room = self.max_length - len(self._prefix_ids[kind])
            if room < _MIN_SUFFIX_TOKENS:
                raise ConfigError(
                    f"hf judge: the {kind} template's shared prefix is {len(self._prefix_ids[kind])} tokens, "
                    f"which leaves {room} of max_length {self.max_length}; raise max_length or use fewer exemplars"
                )
        self._pair_label_ids = pair_label_ids(self.tokenizer, pair.labels, pair.ending)
        self._score_tokens = score_label_tokens(self.tokenizer, score.scores, score.ending)
        self._prefix_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]] | None] = {}

    # ------------------------------------------------------------ loading

    def _load(self) -> tuple[Any, Any]:
        cfg = self.config
        return load_causal_lm(
            cfg.model, self.device, self.dtype, cfg.revision, cfg.trust_remote_code, "hf judge"
        )

    def _resolve_chat_template(self) -> bool:
        return use_chat_template(
            self.tokenizer,
            self.config.chat_template,
            f"hf judge: chat_template is 'on' but the tokenizer of {self.config.model!r} has no chat "
            "template; set chat_template: auto or off",
        )

    def _resolve_max_length(self) -> int:
        """The tightest of: the config's max_length, the model's positions, the tokenizer's limit."""
        limits = [self.config.max_length]
        model_config = self.model.config.get_text_config(decoder=True)
        limits += [getattr(model_config, name, None) for name in ("max_position_embeddings", "n_positions")]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and tokenizer_limit < _UNLIMITED:  # "unset" is a huge number
            limits.append(tokenizer_limit)
        return min((int(x) for x in limits if isinstance(x, int) and x > 0), default=_UNLIMITED)

    def _encode_prefix(self, prefix: str) -> tuple[list[int], str]:
        """Token ids of the shared prefix, and the chat template's text after the user's message."""
        if not self.use_chat:
            return self.tokenizer(prefix, add_special_tokens=True)["input_ids"], ""
        # Render the chat once with a sentinel where the per-item text goes, then split there.
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prefix + _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_SENTINEL) != 1:
            raise ConfigError(
                f"hf judge: the chat template of {self.config.model!r} does not keep the message text "
                "verbatim, so the shared prefix cannot be split out; set chat_template: off"
            )
        head, tail = rendered.split(_SENTINEL)
        # The chat template writes its own special tokens (as `apply_chat_template(tokenize=True)`).
        return self.tokenizer(head, add_special_tokens=False)["input_ids"], tail

    # ------------------------------------------------------------ identity

    @property
    def model_name(self) -> str:
        return self.config.model

    def runs_on(self) -> list[str]:
        return [f"judge {self.config.name or self.backend} ({self.config.model}): {self.precision.line()}"]

    def template_hash(self, kind: str) -> str:
        if kind == "pair":
            return self.templates.pairwise.hash()
        if kind == "score":
            return self.templates.score.hash()
        raise ValueError(f"unknown judgment kind {kind!r} (expected 'pair' or 'score')")

    def fingerprint(self, kind: str) -> dict[str, Any]:
        fp = answer_fields(self.config)  # backend, model, revision, decoding, dtype, max_length, ...
        fp.update(
            template=self.template_hash(kind),
            chat_template=self.use_chat,  # resolved: "auto" differs between tokenizers
            dtype=str(self.dtype).removeprefix("torch."),
            max_length=self.max_length,
            weights=self._weights_stamp,
            commit=self._commit,
        )
        if kind == "score":  # direct scores read tokens without a rationale: decoding does not matter
            for name in _DECODING_FIELDS:
                fp.pop(name, None)
        return fp

    # ------------------------------------------------------------ prompts

    def _pair_pieces(self, item: OrderedPair, rationale: str | None = None, explain: bool = False) -> Pieces:
        """The per-item suffix of a pairwise prompt: the sample, then (with a chat template) the
        end of the user turn, then the ending (or, for `explain`, the request for a rationale)."""
        t = self.templates.pairwise
        fields = {
            "context": item.prompt.strip(),
            "response_1": item.first.strip(),
            "response_2": item.second.strip(),
        }
        sample = t.sample.format(**fields)
        if explain:
            full = t.cot_suffix(item.prompt, item.first, item.second)
        else:
            full = t.suffix(item.prompt, item.first, item.second, rationale)
        return _split_at_context(t.sample, fields, self._chat_tail["pair"] + full[len(sample) :])

    def _score_pieces(self, prompt: str, response: str) -> Pieces:
        t = self.templates.score
        fields = {"context": prompt.strip(), "response": response.strip()}
        sample = t.sample.format(**fields)
        full = t.suffix(prompt, response)
        return _split_at_context(t.sample, fields, self._chat_tail["score"] + full[len(sample) :])

    def _encode(
        self, kind: str, pieces: Sequence[Pieces], reserve: int = 0
    ) -> tuple[list[list[int]], list[bool]]:
        """Suffix ids per item, each at most max_length - prefix - `reserve` tokens, and whether it
        was cut. A long prompt loses tokens from the left of its context first; only if that is not
        enough does it lose the start of the sample. The ending is always kept."""
        budget = self.max_length - len(self._prefix_ids[kind]) - reserve
        whole = encode_continuations(self.tokenizer, [h + c + r for h, c, r in pieces])
        rows: list[list[int]] = []
        cut: list[bool] = []
        for ids, parts in zip(whole, pieces, strict=True):
            if len(ids) <= budget:
                rows.append(ids)
                cut.append(False)
                continue
            head, context, rest = encode_continuations(self.tokenizer, list(parts))
            excess = len(head) + len(context) + len(rest) - budget
            ids = head + context[min(excess, len(context)) :] + rest
            rows.append(ids[-budget:])
            cut.append(True)
        return rows, cut

    def _count_truncated(self, n_items: int, cut_items: set[int]) -> None:
        if cut_items:
            self.truncated += len(cut_items)
            logger.warning(
                "%d of %d judge prompts were longer than max_length=%d and were cut from the left of the context",
                len(cut_items), n_items, self.max_length,
            )  # fmt: skip

    # ------------------------------------------------------------ the forward pass

    def _prefix_cache(self, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys and values of the shared prefix, computed once per kind (None: not reusable)."""
        if not self.config.reuse_prefix_cache:
            return None
        if kind not in self._prefix_kv:
            from transformers import DynamicCache  # why: start-up
            from transformers.cache_utils import DynamicLayer  # why: start-up

            why_not = self._why_no_reuse()
            if why_not is None:
                ids = torch.tensor([self._prefix_ids[kind]], device=self.device)
                with torch.inference_mode():
                    # A plain cache keeps every token, sliding-window layers too; the masks of the
                    # later passes apply the windows (`position_masks`).
                    out = self.model(
                        input_ids=ids, use_cache=True, **{self._cache_arg: DynamicCache()}, **self._keep_last
                    )
                layers = output_cache(out).layers
                if all(type(layer) is DynamicLayer for layer in layers):
                    self._prefix_kv[kind] = [(layer.keys, layer.values) for layer in layers]
                else:
                    why_not = "its cache layers keep state that this reuse would get wrong"
            if why_not is not None:
                logger.warning(
                    "hf judge: the prefix cache is not reused (%s); encoding the prefix per item", why_not
                )
                self._prefix_kv[kind] = None
        return self._prefix_kv[kind]

    def _why_no_reuse(self) -> str | None:
        """Why this model's keys and values cannot be reused exactly (None: they can)."""
        if not self._layout.reusable:
            return "the model has attention layers other than full and sliding-window ones"
        attention = getattr(self.model.config, "_attn_implementation", None)
        if self._layout.needs_masks and attention not in ("sdpa", "eager"):
            return (
                f"its sliding-window layers need per-layer masks, which {attention} attention does not take"
            )
        return None

    def _masks(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor
    ) -> Any:
        """The attention mask argument of a pass over cached rows: the 2-D padding mask for models
        with plain causal layers, per-layer masks from true positions for sliding-window ones."""
        if not self._layout.needs_masks:
            return key_valid
        attention = self.model.config._attn_implementation
        return position_masks(self._layout, query_positions, key_positions, key_valid, attention, self.dtype)

    @property
    def _keep_last(self) -> dict[str, Any]:
        """Forward kwargs that skip the vocabulary projection of positions nobody reads."""
        return {"logits_to_keep": 1} if self._keeps_logits else {}

    def _run(
        self,
        kind: str,
        rows: Sequence[list[int]],
        n_last: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        keys: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """Apply `reduce` ([B, n_last, V] log-probs -> [B, ...]) to every row; results in input
        order, on CPU.

        Rows with the same key (the same context: both orders of a pair, several responses to one
        prompt) form a group whose common leading tokens are encoded once, on top of the shared
        prefix, and reused by each row of the group."""
        size = self.config.batch_size
        if keys is None or self._prefix_cache(kind) is None:
            groups = [[i] for i in range(len(rows))]
        else:
            by_key: dict[Hashable, list[int]] = {}
            for i, key in enumerate(keys):
                by_key.setdefault(key, []).append(i)
            groups = [g[s : s + size] for g in by_key.values() for s in range(0, len(g), size)]
        shared = [_common_length([rows[i] for i in g], n_last) for g in groups]
        tolerance = _PAD_TOLERANCE_CPU if self.device.type == "cpu" else _PAD_TOLERANCE_GPU
        batches = _pack(groups, shared, [len(r) for r in rows], size, tolerance)

        results: list[torch.Tensor | None] = [None] * len(rows)
        with torch.inference_mode():
            for batch in batches:
                log_probs = self._batch_log_probs(kind, [[rows[i] for i in groups[k]] for k in batch], n_last)
                reduced = reduce(log_probs).cpu()
                for j, i in enumerate(i for k in batch for i in groups[k]):
                    results[i] = reduced[j]
        return torch.stack([r for r in results if r is not None])

    def _batch_log_probs(self, kind: str, groups: Sequence[Sequence[list[int]]], n_last: int) -> torch.Tensor:
        """[B, n_last, V] float32 next-token log-probs at the last `n_last` tokens of each row
        (rows flattened group by group); each row is the shared prefix followed by its suffix."""
        from transformers import DynamicCache

        rows = [row for group in groups for row in group]
        prefix_kv = self._prefix_cache(kind)
        if prefix_kv is None:
            return self._full_log_probs(kind, rows, n_last)

        n_prefix, n_groups = len(self._prefix_ids[kind]), len(groups)
        # Each group's common leading tokens, leaving every row at least the n_last tokens it reads.
        shared = [_common_length(group, n_last) for group in groups]
        context_kv = prefix_kv  # what the rows attend to before their own tokens, one entry per group
        context_mask = torch.ones((n_groups, n_prefix), dtype=torch.long, device=self.device)
        if max(shared) > 0:  # stage 1: the groups' common tokens, once per group
            heads, head_mask = self._right_pad(
                [group[0][:s] for group, s in zip(groups, shared, strict=True)]
            )
            context_mask = torch.cat([context_mask, head_mask], dim=1)
            head_positions = n_prefix + torch.arange(heads.shape[1], device=self.device).expand(n_groups, -1)
            context_positions = torch.arange(context_mask.shape[1], device=self.device).expand(n_groups, -1)
            cache = DynamicCache(
                [(k.expand(n_groups, -1, -1, -1), v.expand(n_groups, -1, -1, -1)) for k, v in prefix_kv]
            )
            out = self.model(
                input_ids=heads,
                attention_mask=self._masks(head_positions, context_positions, context_mask),
                position_ids=head_positions,
                use_cache=True,
                **{self._cache_arg: cache},
                **self._keep_last,
            )
            context_kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]

        # Stage 2: each row's own tokens, attending to the prefix and its group's tokens (a group
        # padded to the longest in the batch is masked out, so positions continue without gaps).
        group_of = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=self.device)
        row_shared = torch.tensor(
            [s for group, s in zip(groups, shared, strict=True) for _ in group], device=self.device
        )
        tails, tail_mask = self._right_pad(
            [row[s:] for group, s in zip(groups, shared, strict=True) for row in group]
        )
        width = tails.shape[1]
        lengths = tail_mask.sum(dim=1)
        positions = lengths[:, None] - n_last + torch.arange(n_last, device=self.device)[None, :]
        tail_positions = (n_prefix + row_shared)[:, None] + torch.arange(width, device=self.device)[None, :]
        row_context = context_mask.index_select(0, group_of)
        context_positions = torch.arange(row_context.shape[1], device=self.device).expand(len(rows), -1)
        cache = DynamicCache([(_rows_of(k, group_of), _rows_of(v, group_of)) for k, v in context_kv])
        return self._read(
            positions,
            input_ids=tails,
            attention_mask=self._masks(
                tail_positions,
                torch.cat([context_positions, tail_positions], dim=1),
                torch.cat([row_context, tail_mask], dim=1),
            ),
            position_ids=tail_positions,
            use_cache=True,
            **{self._cache_arg: cache},
        )

    def _full_log_probs(self, kind: str, rows: Sequence[list[int]], n_last: int) -> torch.Tensor:
        """The same as `_batch_log_probs` without any cache: prefix + suffix, one pass per batch."""
        prefix = self._prefix_ids[kind]
        ids, mask = self._right_pad([prefix + row for row in rows])
        lengths = mask.sum(dim=1)
        positions = lengths[:, None] - n_last + torch.arange(n_last, device=self.device)[None, :]
        return self._read(
            positions,
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(ids.shape[1], device=self.device).expand(len(rows), -1),
            use_cache=False,
        )

    def _read(self, positions: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """Run the model and return [B, n_last, V] float32 log-probs at `positions` [B, n_last]."""
        if self._keeps_logits:  # project only the positions read onto the (large) vocabulary
            keep = torch.unique(positions)
            _, logits = lm_forward(self.model, **inputs, logits_to_keep=keep)
            index = torch.searchsorted(keep, positions)
        else:  # the head projects only the positions read all the same, where it is a plain one
            _, logits = lm_forward(self.model, **inputs)
            index = positions
        picked = logits[torch.arange(len(positions), device=self.device)[:, None], index]
        if isinstance(picked, HeadInput):
            picked = picked.project()
        return picked.float().log_softmax(dim=-1)

    def _right_pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention mask on the model's device; right padding, so real tokens never
        attend to pads and every real token keeps its position."""
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------ pairwise

    def _p_first(self, rows: Sequence[list[int]], contexts: Sequence[str]) -> torch.Tensor:
        def reduce(log_probs: torch.Tensor) -> torch.Tensor:
            return pair_probability(log_probs[:, 0], self._pair_label_ids)

        return self._run("pair", rows, 1, reduce, keys=contexts)

    def judge_orders(self, items: Sequence[OrderedPair]) -> list[OrderJudgment]:
        items = list(items)
        if not items:
            return []
        cut_items: set[int] = set()
        if not self.config.cot:
            rows, cut = self._encode("pair", [self._pair_pieces(item) for item in items])
            cut_items.update(i for i, c in enumerate(cut) if c)
            p_first = self._p_first(rows, [item.prompt for item in items])
            self._count_truncated(len(items), cut_items)
            return [OrderJudgment(p_first=float(p)) for p in p_first]

        # Chain of thought: (1) decode rationales; (2) score the labels after each rationale.
        rationales = self._rationales(items, cut_items)
        n = self.config.self_consistency
        pieces = [self._pair_pieces(item, r) for item, rs in zip(items, rationales, strict=True) for r in rs]
        rows, cut = self._encode("pair", pieces)
        cut_items.update(k // n for k, c in enumerate(cut) if c)
        contexts = [item.prompt for item in items for _ in range(n)]
        p_first = self._p_first(rows, contexts).view(len(items), n).mean(dim=1)  # self-consistency: the mean
        self._count_truncated(len(items), cut_items)
        return [
            OrderJudgment(p_first=float(p), rationales=rs) for p, rs in zip(p_first, rationales, strict=True)
        ]

    # ------------------------------------------------------------ chain of thought

    def _rationales(self, items: Sequence[OrderedPair], cut_items: set[int]) -> list[list[str]]:
        """`self_consistency` rationales per item: greedy for one, sampled at `temperature` for more."""
        cfg = self.config
        prefix = self._prefix_ids["pair"]
        room = self.max_length - len(prefix)
        max_new = max(1, min(cfg.max_rationale_tokens, room - _MIN_SUFFIX_TOKENS // 2))
        rows, cut = self._encode("pair", [self._pair_pieces(item, explain=True) for item in items], max_new)
        cut_items.update(i for i, c in enumerate(cut) if c)
        prompts = [prefix + row for row in rows]
        out: list[list[str]] = [[] for _ in items]
        with torch.inference_mode():
            if cfg.self_consistency == 1:
                order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    texts = self._generate([prompts[i] for i in idx], max_new, sample=False, n=1)
                    for i, text in zip(idx, texts, strict=True):
                        out[i] = [text]
            else:
                # One seeded call per item, its samples batched: an item's rationales do not depend
                # on which other items share the call, so reruns and cached reruns agree.
                for i, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
                    seed = _item_seed(cfg.seed, item)
                    devices = [self.device] if self.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                        torch.manual_seed(seed)
                        out[i] = self._generate([prompt], max_new, sample=True, n=cfg.self_consistency)
        return out

    def _generate(self, prompts: Sequence[list[int]], max_new: int, sample: bool, n: int) -> list[str]:
        """Decode continuations of left-padded prompts; n per prompt, flattened prompt-major."""
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p) :] = 1
        ending = self.templates.pairwise.ending
        # Every setting spelled out, so a model's own generation defaults (top_p, repetition
        # penalty, sampling) cannot change the rationale.
        settings: dict[str, Any] = {
            "max_new_tokens": max_new, "do_sample": sample, "num_return_sequences": n,
            "pad_token_id": self._pad_id, "eos_token_id": self.tokenizer.eos_token_id,
            "repetition_penalty": 1.0, "stop_strings": [ending],
        }  # fmt: skip
        if sample:
            settings.update(temperature=self.config.temperature, top_k=0, top_p=1.0)
        generated = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=GenerationConfig(**settings),
            tokenizer=self.tokenizer,  # needed by stop_strings
        )
        texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        # A model that follows the few-shot format writes the ending and a label next: keep only
        # the explanation, step 2 appends the ending itself.
        return [text.split(ending)[0].strip() for text in texts]

    # ------------------------------------------------------------ direct score (d-RLAIF)

    def score_responses(self, items: Sequence[tuple[str, str]]) -> list[ScoreJudgment]:
        items = list(items)
        if not items:
            return []
        plan = self._score_tokens
        # With a two-token score ("10" = "1" "0"), each row gets the lead token appended, and the
        # same pass reads P(score token) at the ending and P("0" | "1") one position later.
        extra = [] if plan.lead is None else [plan.lead]
        rows, cut = self._encode("score", [self._score_pieces(p, r) for p, r in items], reserve=len(extra))
        rows = [row + extra for row in rows]
        n_last = 1 + len(extra)

        def reduce(lp: torch.Tensor) -> torch.Tensor:
            after_lead = lp[:, 1] if extra else None
            return score_log_distribution(lp[:, 0], after_lead, plan).exp()

        probs = self._run("score", rows, n_last, reduce, keys=[prompt for prompt, _ in items])
        self._count_truncated(len(items), {i for i, c in enumerate(cut) if c})
        values = torch.tensor(plan.values)
        expected = (probs * values).sum(dim=-1)
        low, high = min(plan.values), max(plan.values)
        return [
            ScoreJudgment(score=expected_score_to_unit(float(e), low, high), expected=float(e))
            for e in expected
        ]

    def close(self) -> None:
        self._prefix_kv.clear()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _item_seed(seed: int, item: OrderedPair) -> int:
    text = "\0".join((str(seed), item.prompt, item.first, item.second))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % (2**63)


def _pack(
    groups: Sequence[list[int]], shared: Sequence[int], lengths: Sequence[int], size: int, tolerance: float
) -> list[list[int]]:
    """Batches of group indices: at most `size` rows each, and padded tokens at most (1 + tolerance)
    times the real ones. Groups are sorted by their own tokens, then by their shared tokens
    (longest first, so memory problems show at once); a batch pads every group to the longest
    shared part and every row to the longest own part."""
    tails = [max(lengths[i] for i in g) - s for g, s in zip(groups, shared, strict=True)]
    order = sorted(range(len(groups)), key=lambda k: (-tails[k], -shared[k]))
    batches: list[list[int]] = []
    n_rows = real = max_shared = max_tail = 0
    for k in order:
        g_rows = len(groups[k])
        g_real = shared[k] + sum(lengths[i] - shared[k] for i in groups[k])
        new_shared, new_tail = max(max_shared, shared[k]), max(max_tail, tails[k])
        padded = (len(batches[-1]) + 1 if batches else 1) * new_shared + (n_rows + g_rows) * new_tail
        if batches and n_rows + g_rows <= size and padded <= (1 + tolerance) * (real + g_real):
            batches[-1].append(k)
            n_rows, real, max_shared, max_tail = n_rows + g_rows, real + g_real, new_shared, new_tail
        else:
            batches.append([k])
            n_rows, real, max_shared, max_tail = g_rows, g_real, shared[k], tails[k]
    return batches


def _rows_of(states: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """Keys or values [G, ...] repeated for each batch row (`group_of` gives each row's group);
    a view when there is one entry, as the cache copies it anyway."""
    if states.shape[0] == 1:
        return states.expand(len(group_of), -1, -1, -1)
    return states.index_select(0, group_of)


def _common_length(rows: Sequence[list[int]], n_last: int) -> int:
    """Length of the rows' common leading tokens, leaving each row at least `n_last` of its own."""
    limit = min(len(r) for r in rows) - n_last
    if len(rows) == 1 or limit <= 0:
        return 0
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows[1:]):
        n += 1
    return n

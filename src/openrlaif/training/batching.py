"""Which examples go into which step: seeded, resumable, sharded batches, the held-out split,
right padding, and the number of optimizer steps a run takes."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from openrlaif.training.config import TrainConfig
from openrlaif.training.errors import TrainingError


class ShardedBatches:
    """Seeded, resumable micro-batches of example indices, sharded across processes.

    Every epoch is a permutation drawn from (seed, epoch). Global micro-batch j is the slice
    [j·B·W, (j+1)·B·W) of it, and process r takes the r-th block of B: with one process this is
    plain shuffled batching, with W processes each sees different examples (like
    DistributedSampler). The incomplete last global batch is dropped so every process runs the
    same number of steps (DDP needs that). The position (epoch, batch) goes into checkpoints.

    With `lengths` (tokens per example) the batches are grouped by length, as transformers'
    `LengthGroupedSampler`: the epoch's permutation is cut into chunks of up to 50 global batches
    (at most a quarter of the epoch), each chunk is sorted by length and cut into global batches,
    and the order of all the epoch's batches is shuffled. The examples of an epoch are the same
    as without grouping; a batch holds examples of similar length, so it needs less padding.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.lengths = None if lengths is None else list(lengths)
        self.batches_per_epoch = n // (batch_size * world_size)
        self.epoch, self.batch = 0, 0
        self._order: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
            self._order = order if self.lengths is None else self._grouped(order, generator)
        return self._order

    def _grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        lengths = self.lengths
        assert lengths is not None
        size = self.batch_size * self.world_size  # one global batch
        used = order[: self.batches_per_epoch * size]  # the examples an ungrouped epoch uses
        chunk = size * max(1, min(50, self.batches_per_epoch // 4))
        batches = []
        for start in range(0, len(used), chunk):
            # longest first; the sort is stable, so examples of equal length stay in random order
            by_length = sorted(used[start : start + chunk], key=lambda i: -lengths[i])
            batches += [by_length[k : k + size] for k in range(0, len(by_length), size)]
        return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]

    def next_batch(self) -> list[int]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        self.batch += 1
        return self._permutation()[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def eval_shard(n: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """This process's share of n held-out examples as (index, counts). Every process gets the same
    number of items (a sharded model's forward is collective), padded with repeats that do not count."""
    per_process = math.ceil(n / world_size)
    return [(i % n, i < n) for i in range(rank, per_process * world_size, world_size)]


def split_held_out(
    items: Sequence[Any], config: TrainConfig, eval_items: Sequence[Any] | None = None
) -> tuple[list[Any], list[Any]]:
    """(train, held-out): `eval_items` when given, else a seeded `eval_fraction` of `items`.

    Items that share a prompt (several pairs of one prompt's samples) are held out together:
    a pair whose responses also occur in training pairs would not measure generalisation. With
    distinct prompts this is a plain seeded sample of items."""
    items = list(items)
    if eval_items is not None:
        held_out = list(eval_items)
    elif config.eval_fraction > 0 and len(items) > 1:
        order = list(range(len(items)))
        random.Random(config.seed).shuffle(order)
        n_eval = max(1, round(config.eval_fraction * len(items)))
        if config.max_eval_examples is not None:
            n_eval = min(n_eval, config.max_eval_examples)
        by_prompt: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            by_prompt.setdefault(getattr(item, "prompt", i), []).append(i)
        held: set[int] = set()
        for i in order:
            if len(held) >= n_eval:
                break
            held.update(by_prompt[getattr(items[i], "prompt", i)])
        if len(held) == len(items):  # one prompt only: keep something to train on
            held = set(order[:n_eval])
        held_out = [items[i] for i in sorted(held)]
        items = [x for i, x in enumerate(items) if i not in held]
    else:
        held_out = []
    if config.max_eval_examples is not None:
        held_out = held_out[: config.max_eval_examples]
    return items, held_out


def pad_right(seqs: Sequence[Sequence[int]], pad_value: int, multiple: int = 1) -> torch.Tensor:
    """Right-padded to the longest sequence, rounded up to a multiple of `multiple`."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([list(s) + [pad_value] * (width - len(s)) for s in seqs], dtype=torch.long)


def plan_steps(config: TrainConfig, loader: ShardedBatches, n_train: int, world_size: int) -> int:
    """Total optimizer steps: `max_steps`, or `epochs` passes over the training examples."""
    if loader.batches_per_epoch == 0:
        raise TrainingError(
            f"batch_size {config.batch_size} x {world_size} process(es) needs at least "
            f"{config.batch_size * world_size} training examples; the data has {n_train} after the held-out split"
        )
    if config.max_steps is not None:
        return config.max_steps
    steps_per_epoch = max(1, loader.batches_per_epoch // config.grad_accum_steps)
    return max(1, math.ceil(config.epochs * steps_per_epoch))

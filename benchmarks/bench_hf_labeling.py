"""Pairwise AI labeling with a local causal LM: HFJudge against the straightforward approach.

Both label the same 256 HH-RLHF pairs in both orders (512 prompts) with the same tiny GPT-2
architecture model (built locally, random weights), or a real model (`--model
packaged:gemma-3-270m`: Gemma 3's sliding-window layers), the harmless template and 2 few-shot
exemplars, on the same threads and dtype; warm-up excluded.

- baseline: one `model.generate(max_new_tokens=1, output_scores=True)` call per ordered pair on the
  full prompt, reading the label tokens' scores of the first generated token;
- ours: `HFJudge.judge_orders` on all 512 ordered pairs (shared-prefix KV cache, each pair's
  context encoded once for both orders, length-sorted batches, one forward pass per batch, logits
  only where they are read).

Both tokenize a prompt as prefix ids + suffix ids, so their P(first) must agree to float noise.

    .venv/bin/python benchmarks/bench_hf_labeling.py [--pairs 256] [--threads 2] [--batch-size 16] [--dtype bfloat16]
    .venv/bin/python benchmarks/bench_hf_labeling.py --model packaged:gemma-3-270m --pairs 48
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from openrlaif.config import HFJudgeConfig
from openrlaif.data.datasets import load_pairs
from openrlaif.data.records import Pair
from openrlaif.judges.base import OrderedPair
from openrlaif.judges.hf import HFJudge
from openrlaif.judges.prompts import Exemplar, TemplateSet, load_template_set
from openrlaif.judges.tokens import encode_continuation, pair_label_ids, pair_probability
from openrlaif.models.names import resolve_model_path
from openrlaif.models.tiny import build_tiny_causal_lm


def bounded(context: str, max_chars: int) -> str:
    """The last `max_chars` characters of a dialogue: its latest turns matter most."""
    return context if len(context) <= max_chars else context[-max_chars:]


def write_template(pairs: list[Pair], out: Path, max_chars: int) -> Path:
    """The harmless template with few-shot exemplars taken from dataset pairs the benchmark does not label."""
    base = load_template_set("harmless")
    exemplars = [
        Exemplar(
            context=bounded(p.prompt, max_chars),
            response_1=p.response_a,
            response_2=p.response_b,
            label="1" if (p.human_label or 0.0) >= 0.5 else "2",
        )
        for p in pairs
    ]
    templates = TemplateSet(
        pairwise=base.pairwise.model_copy(update={"exemplars": exemplars}), score=base.score
    )
    out.write_text(yaml.safe_dump(templates.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return out


def baseline(judge: HFJudge, items: list[OrderedPair]) -> list[float]:
    """The straightforward way: one generate call per ordered pair, full prompt, unbatched."""
    model, tokenizer = judge.model, judge.tokenizer
    template = judge.templates.pairwise
    labels = pair_label_ids(tokenizer, template.labels, template.ending)
    out: list[float] = []
    with torch.inference_mode():
        for item in items:
            ids = tokenizer(template.prefix(), add_special_tokens=True)["input_ids"]
            ids += encode_continuation(tokenizer, template.suffix(item.prompt, item.first, item.second))
            input_ids = torch.tensor([ids], device=model.device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )
            log_probs = generated.scores[0].float().log_softmax(dim=-1)
            out.append(float(pair_probability(log_probs, labels)[0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--exemplars", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-context-chars", type=int, default=1000, help="contexts are cut to their end")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="ours without the shared-prefix KV cache"
    )
    parser.add_argument("--rounds", type=int, default=4, help="the methods alternate over this many chunks")
    parser.add_argument("--model-dir", type=Path, help="reuse a model built by an earlier run")
    parser.add_argument(
        "--model", help="a real model instead of the tiny GPT-2, any model name, e.g. packaged:gemma-3-270m"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    torch.set_num_threads(args.threads)
    records = load_pairs("hh-harmless").records
    pairs = records[: args.pairs]
    shots = records[args.pairs : args.pairs + args.exemplars]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(resolve_model_path(args.model)) if args.model else args.model_dir
        if model_dir is None or not (model_dir / "config.json").exists():
            model_dir = model_dir or Path(tmp) / "tiny-gpt2"
            t0 = time.perf_counter()
            build_tiny_causal_lm(
                model_dir, arch="gpt2", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, seed=0
            )
            print(f"built tiny GPT-2 (hidden 256, 4 layers, vocab 2048) in {time.perf_counter() - t0:.1f}s")
        template = write_template(shots, Path(tmp) / "harmless-2shot.yaml", args.max_context_chars)

        def make_judge() -> HFJudge:
            config = HFJudgeConfig(
                model=str(model_dir), template=str(template), dtype=args.dtype, device="cpu",
                batch_size=args.batch_size, reuse_prefix_cache=not args.no_prefix_cache,
            )  # fmt: skip
            return HFJudge(config)

        items: list[OrderedPair] = []
        for p in pairs:
            context = bounded(p.prompt, args.max_context_chars)
            items += [
                OrderedPair(context, p.response_a, p.response_b),
                OrderedPair(context, p.response_b, p.response_a),
            ]

        judge = make_judge()
        t = judge.templates.pairwise
        prefix_tokens = len(judge.tokenizer(t.prefix())["input_ids"])
        suffix_tokens = [
            len(encode_continuation(judge.tokenizer, t.suffix(i.prompt, i.first, i.second))) for i in items
        ]
        print(
            f"{len(pairs)} pairs, {len(items)} ordered prompts; shared prefix {prefix_tokens} tokens, "
            f"suffix mean {sum(suffix_tokens) / len(suffix_tokens):.0f} / max {max(suffix_tokens)} tokens; "
            f"threads {args.threads}, dtype {args.dtype}, batch size {args.batch_size}"
        )

        # Warm-up (kernels, allocator), excluded from the timings.
        baseline(judge, items[:4])
        judge.judge_orders(items[:8])

        # The machine may be shared: the two methods take turns on the same chunks of pairs, so a
        # change in background load hits both alike.
        ours = make_judge()  # a new judge: encoding the shared prefix is inside the timing
        p_base: list[float] = []
        p_ours: list[float] = []
        t_base = t_ours = 0.0
        chunk = 2 * -(-len(pairs) // args.rounds)
        for r, start in enumerate(range(0, len(items), chunk)):
            part = items[start : start + chunk]
            for method in ("base", "ours") if r % 2 == 0 else ("ours", "base"):
                t0 = time.perf_counter()
                if method == "base":
                    p_base += baseline(judge, part)
                    t_base += time.perf_counter() - t0
                else:
                    p_ours += [j.p_first for j in ours.judge_orders(part)]
                    t_ours += time.perf_counter() - t0

    n = len(pairs)
    diff = max(abs(a - b) for a, b in zip(p_base, p_ours, strict=True))
    print(f"baseline (generate per order, full prompt): {n / t_base:8.2f} pairs/s  ({t_base:.1f}s)")
    print(f"HFJudge.judge_orders                      : {n / t_ours:8.2f} pairs/s  ({t_ours:.1f}s)")
    print(f"speed-up: {t_base / t_ours:.2f}x   max |P_baseline(first) - P_ours(first)| = {diff:.2e}")


if __name__ == "__main__":
    main()

"""The RL loop, top to bottom (`train_rl`): every step samples, rewards, scores and updates.

1. take `batch_size` prompts per process (sharded across processes like the other trainers);
2. sample `num_samples` (K) responses per prompt from the current policy, in process or through
   an OpenAI-compatible server that reloads the policy every `sync_every` steps (rollout.py);
3. reward each response (rewards.py);
4. log-probs of the sampled response tokens under the policy and the reference (rollout.py);
5. shape the reward per token with the KL penalty (rewards.py);
6. the update of the configured algorithm (`ALGORITHMS[config.algorithm].update`, one file each).

Checkpoints hold the policy, the value model (`value/`), the optimizer, scheduler, RNG states
and the prompt position; `--resume` continues exactly (with server rollouts, as exactly as the
server samples).

With `lora`, the policy trains LoRA adapters only and the KL reference is the same model with its
adapters off (no second copy; unless `ref_model` names another model); checkpoints hold the
adapters. The value model (REINFORCE with a baseline, PPO) stays a full separate model, trained
in full.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from openrlaif.data.datasets import load_prompts
from openrlaif.data.refs import pair_records
from openrlaif.inference.server import RolloutSampler
from openrlaif.models.heads import TokenValueModel
from openrlaif.models.loading import load_pretrained, load_tokenizer, quiet_transformers
from openrlaif.models.names import resolve_model_path
from openrlaif.training.accelerator import make_accelerator, set_seed, training_precision
from openrlaif.training.batching import ShardedBatches, plan_steps
from openrlaif.training.checkpoint import load_checkpoint, save_checkpoint, save_model_folder
from openrlaif.training.errors import TrainingError, check_finite
from openrlaif.training.metrics import ExampleIdLog, MetricsLogger, Throughput
from openrlaif.training.optim import make_scheduler
from openrlaif.training.rl.algorithms import ALGORITHMS
from openrlaif.training.rl.anchors import Anchors
from openrlaif.training.rl.config import RLBaseConfig
from openrlaif.training.rl.diagnostics import comparison_diagnostics, diagnostics_due, gold_agreement, pearson
from openrlaif.training.rl.guards import canaries_above, canary_due, canary_means, length_adjusted
from openrlaif.training.rl.rewards import make_rewarder, standardized
from openrlaif.training.rl.rollout import (
    build_sequences,
    fuse_activations,
    greedy_reference_answers,
    has_checkpointable_layers,
    rollout_logp_gap,
    sample_responses,
    score_rollout,
    sync_policy,
)
from openrlaif.training.rl.updater import Updater, make_rl_optimizer, prepare_trained
from openrlaif.training.run import (
    TrainResult,
    apply_lora,
    export_merged,
    one_writer_per_output_dir,
    prepare_run,
    simulate_kill,
    weights_source,
)


def check_canaries(
    config: RLBaseConfig, accelerator: Any, logger: MetricsLogger, step: int, last_checkpoint: Path | None,
    means: dict[str, float], scores: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """The canaries' mean rewards (over every process) against the median reward of the policy's
    samples: `canary/*` metrics, a warning naming the canaries above it, and with
    `canary_action: stop` a one-line error (every process stops together)."""
    names = list(means)
    local = torch.tensor([means[n] for n in names], dtype=torch.float64, device=scores.device)
    means = dict(zip(names, (accelerator.reduce(local, "mean")).tolist(), strict=True))
    everyone = accelerator.gather(scores.float()).tolist()
    above = canaries_above(means, everyone)
    metrics = {f"canary/{n}": v for n, v in means.items()} | {"canary/above_median": float(len(above))}
    if above:
        median = statistics.median(everyone)
        line = (
            f"step {step}: the reward source scores canary response(s) above the median reward "
            f"{median:.3g} of the policy's samples: "
            + ", ".join(f"{n} {means[n]:.3g}" for n in above)
            + " (see training/rl/guards.py; length_penalty, length_controlled or another judge may help)"
        )
        if config.canary_action == "stop":
            kept = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
            raise TrainingError(line + f"; stopped (canary_action: stop){kept}")
        logger.print("warning: " + line)
    return metrics


@one_writer_per_output_dir
def train_rl(
    config: RLBaseConfig, resume: bool = False, show_progress: bool = True, *, judge: Any = None
) -> TrainResult:
    """Train; with `resume`, continue from the newest checkpoint in `output_dir` exactly.
    `judge` replaces the configured judge (a `Judge` object, e.g. for tests)."""
    from transformers import AutoModelForCausalLM  # why: transformers is slow to import

    algorithm = ALGORITHMS[config.algorithm]
    quiet_transformers()
    accelerator = make_accelerator(config)
    output_dir, checkpoint = prepare_run(config, resume, accelerator)
    set_seed(config.seed)
    device = accelerator.device

    prompts = load_prompts(config.data, limit=config.limit).records
    if not prompts:
        raise TrainingError(f"{config.data}: no prompts")

    # Models: policy (trained), reference (frozen SFT), value model (a copy of the SFT body + head).
    with accelerator.main_process_first():  # a `tiny:` model is built once
        sft_path = resolve_model_path(config.model)
        ref_path = resolve_model_path(config.ref_model) if config.ref_model else sft_path
    source = str(checkpoint.model_dir) if checkpoint else sft_path
    tokenizer = load_tokenizer(source, config.revision, config.trust_remote_code)
    # with LoRA the checkpoint holds the adapters only: the weights are the SFT model's
    policy = load_pretrained(
        AutoModelForCausalLM, weights_source(config, checkpoint), config.revision, config.trust_remote_code
    )
    policy = apply_lora(policy, config, checkpoint, "causal_lm")
    reference = None  # with LoRA (and no `ref_model`): the policy with its adapters off
    if config.lora is None or config.ref_model:
        reference = load_pretrained(AutoModelForCausalLM, ref_path, config.revision, config.trust_remote_code)
        reference.to(device).eval().requires_grad_(False)
    value_model: torch.nn.Module | None = None
    if config.uses_value_model:
        value_source = str(checkpoint.path / "value") if checkpoint else sft_path
        value_model = TokenValueModel.from_pretrained(value_source, config.revision, config.trust_remote_code)
    if config.fused_activations:
        for model in (policy, reference, value_model):
            if model is not None:
                fuse_activations(model)
    rewarder = make_rewarder(config, tokenizer, device, judge)
    gold = pair_records(config.gold_pairs, config.gold_limit, "gold_pairs") if config.gold_pairs else []
    anchors = None  # judge_pairwise against one anchor response per prompt
    if config.reward.type == "judge_pairwise" and config.reward.comparisons == "anchor":
        anchors = Anchors(config.reward.anchor, output_dir, accelerator.process_index)
    server, sync_dir = None, output_dir / "rollout_policy"  # RL samples in process unless a server is set
    if config.rollout_server is not None:
        server = RolloutSampler(
            config.rollout_server, config.temperature, config.top_p, config.max_new_tokens
        )
        sync_dir = Path(config.rollout_server.sync_dir or sync_dir)

    loader = ShardedBatches(
        len(prompts), config.batch_size, accelerator.num_processes, accelerator.process_index, config.seed
    )
    # one batch of prompts per step (accumulation splits a step's rollout, it takes no more prompts)
    total_steps = plan_steps(config.model_copy(update={"grad_accum_steps": 1}), loader, len(prompts),
                             accelerator.num_processes)  # fmt: skip
    optimizer = make_rl_optimizer(policy, value_model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    policy, value_model, optimizer = prepare_trained(accelerator, policy, value_model, optimizer)
    trained = [policy] + ([value_model] if value_model is not None else [])
    start_step = (
        load_checkpoint(checkpoint, accelerator, optimizer, scheduler, loader, trained) if checkpoint else 0
    )
    for m in trained:  # dropout off: the update's log-probs must be those the samples were drawn from
        m.eval()
    checkpointing = config.gradient_checkpointing and all(has_checkpointable_layers(m) for m in trained)
    updater = Updater(accelerator, optimizer, trained, config.max_grad_norm, checkpointing)

    logger = MetricsLogger(accelerator, output_dir, config, total_steps, start_step, f"RL ({config.algorithm})",
                           show_progress)  # fmt: skip
    ids_log = ExampleIdLog(output_dir, accelerator.process_index, config.record_example_ids)
    k = config.num_samples
    logger.print(
        f"RL ({config.algorithm}, reward {config.reward.type}): {len(prompts)} prompts; {total_steps} steps of "
        f"{config.batch_size * accelerator.num_processes} prompts x {k} samples; β {config.beta}, temperature "
        f"{config.temperature}; {training_precision(config).line()}"
        + (f"; {config.grad_accum_steps} micro-batches per update" if config.grad_accum_steps > 1 else "")
        + (f"; resuming after step {start_step} from {checkpoint.path}" if checkpoint else "")
    )
    for line in rewarder.runs_on:
        logger.print(line)
    if config.gradient_checkpointing and not checkpointing:
        logger.print(
            "note: gradient_checkpointing is on, but the model has no Hugging Face checkpointable layers"
        )
    last_checkpoint = checkpoint.path if checkpoint else None
    if gold and start_step == 0 and config.judge_diagnostics_every > 0:  # the reward source before training
        agreement = gold_agreement(rewarder.prefers, gold)
        logger.log(0, {"judge/gold_agreement": agreement})
        logger.print(
            f"reward source vs people on {len(gold)} gold pairs before training: {agreement:.1%} agreement"
        )
    throughput = Throughput()
    try:
        for step in range(start_step + 1, total_steps + 1):
            # 1-2. prompts and K samples each (a fresh seed per step; per-sample seeds as in `generate`)
            chunk = [prompts[i] for i in loader.next_batch()]
            seed = config.seed * 1_000_003 + step
            if server is not None:  # the server samples from the policy it was last given
                assert config.rollout_server is not None
                if step == start_step + 1 or (step - 1) % config.rollout_server.sync_every == 0:
                    sync_policy(accelerator, policy, tokenizer, server, sync_dir, step - 1)
            samples = sample_responses(config, accelerator, policy, tokenizer, chunk, seed, server)
            prompt_texts = [p.prompt for p in chunk for _ in range(k)]

            # 3. rewards
            anchor_texts = None
            if anchors is not None:
                greedy = functools.partial(
                    greedy_reference_answers, config, accelerator, policy, reference, tokenizer
                )
                anchor_texts = [a for a in anchors.for_prompts(chunk, greedy) for _ in range(k)]
            rewards = rewarder.reward(prompt_texts, [s.response_text for s in samples],
                                      [s.response_ids for s in samples], anchor_texts)  # fmt: skip
            scores = torch.tensor(rewards.scores, dtype=torch.float32, device=device)
            guarded: dict[str, float] = {}
            if canary_due(config.canary_every, step, start_step):  # does the reward source prefer junk?
                group_anchors = anchor_texts[::k] if anchor_texts is not None else None
                groups = [[s.response_text for s in samples[g * k : (g + 1) * k]] for g in range(len(chunk))]
                guarded = check_canaries(config, accelerator, logger, step, last_checkpoint, canary_means(
                    rewarder.score_alone, [p.prompt for p in chunk], groups, group_anchors), scores)  # fmt: skip
            # summed over processes, so every process stops together
            check_finite(step, "reward", accelerator.reduce(scores.sum(), "sum"), last_checkpoint)

            # 4-6. log-probs, the KL-shaped reward, advantages and the update
            seqs = build_sequences(samples, tokenizer.pad_token_id, device)
            lengths = seqs.mask.sum(-1)  # response tokens per sample
            learning_rate = scheduler.get_last_lr()[0]
            trained_on = length_adjusted(scores, lengths, config.length_penalty, config.length_controlled,
                                         config.max_new_tokens)  # fmt: skip
            shaped = standardized(trained_on, accelerator) if config.normalize_rewards else trained_on
            rollout = score_rollout(config, accelerator, policy, reference, value_model, checkpointing, seqs,
                                    shaped, step, last_checkpoint)  # fmt: skip
            losses = algorithm.update(config, updater, rollout)
            if (
                server is not None
            ):  # how far the server's log-probs are from the trainer's (0: the same weights)
                losses["rollout_logp_gap"] = rollout_logp_gap(samples, rollout.old_logp)
            scheduler.step()
            ids_log.write(step, [f"{p.id}-{i}" for p in chunk for i in range(k)])

            # Log: means over all processes; samples and tokens summed.
            tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
            local = torch.stack([
                scores.mean(), scores.std(unbiased=False), rollout.seq_kl.mean(), lengths.mean(),
                *[v.to(device).float() for v in losses.values()],
                torch.tensor(float(len(samples)), device=device), torch.tensor(float(tokens), device=device),
            ]).double()  # fmt: skip
            total = accelerator.reduce(local, "sum")
            n = accelerator.num_processes
            names = ["reward_mean", "reward_std", "kl", "response_length", *losses]
            metrics = {f"train/{name}": total[i].item() / n for i, name in enumerate(names)}
            metrics["train/objective"] = (1 - config.beta) * metrics[
                "train/reward_mean"
            ] - config.beta * metrics["train/kl"]
            metrics["train/learning_rate"] = learning_rate
            metrics |= {
                f"train/{k_}": v for k_, v in throughput.rates(total[-2].item(), total[-1].item()).items()
            }
            metrics |= guarded
            diagnose = diagnostics_due(config, step)
            if diagnose:  # how far the reward source can be trusted (diagnostics.py)
                metrics |= comparison_diagnostics(rewards.comparisons)
                metrics["judge/reward_length_corr"] = pearson(rewards.scores, lengths.tolist())
                if gold:
                    metrics["judge/gold_agreement"] = gold_agreement(rewarder.prefers, gold)
            if step % config.log_every == 0 or step == total_steps or diagnose:
                logger.log(step, metrics)
            judged = "".join(f" {label} {metrics[key]:.0%}" for key, label in (
                ("judge/order_flip_rate", "flips"), ("judge/gold_agreement", "gold")) if key in metrics)  # fmt: skip
            logger.advance(
                step, f"reward {metrics['train/reward_mean']:.3f} kl {metrics['train/kl']:.3f}{judged}"
            )
            simulate_kill(step)

            if step % config.save_every == 0 or step == total_steps:
                extra = {"value": value_model} if value_model is not None else None
                last_checkpoint = save_checkpoint(
                    accelerator, output_dir, step, policy, tokenizer, optimizer, scheduler, loader,
                    config.keep_checkpoints, extra_models=extra,
                )  # fmt: skip
            throughput.started = time.perf_counter()  # saving is not training time
    finally:
        logger.close()
        if server is not None:  # stops the llama.cpp servers openrlaif started
            server.close()

    model_dir = output_dir / "model"
    # with LoRA: the adapters merged into the weights, or alone (`lora.export`)
    save_model_folder(accelerator, policy, tokenizer, model_dir, merged=export_merged(config))
    if value_model is not None:
        save_model_folder(accelerator, value_model, tokenizer, output_dir / "value")
    accelerator.wait_for_everyone()
    logger.print(f"RL done: {total_steps} steps; policy -> {model_dir}")
    # RL holds no prompts out: no held-out metrics (the per-step training ones are in metrics.jsonl)
    return TrainResult(
        output_dir=output_dir, model_dir=model_dir, steps=total_steps, metrics={}, first_metrics=None,
        model=accelerator.unwrap_model(policy),
    )  # fmt: skip

"""The pipeline's stages, planned from its config, in the order they run.

    align              the judge against human labels                 -> align.json
    distill:<teacher>  a teacher writes demonstrations                -> data/distill-<teacher>.jsonl
    sft:<policy>       SFT on demonstrations                          -> <policy>/model
    candidates         the feedback policy samples responses, paired  -> candidates.jsonl, pairs.jsonl
    label              the judge labels each pair, both orders        -> labeled.jsonl
    reward_model       soft-label reward model on the labels          -> rm/model
    rl:<policy>        RL against the reward model or the judge       -> <policy>/model
    dpo:<policy>       DPO on the labels                              -> <policy>/model
    eval:<a>-vs-<b>    win rate, harmless rate, lengths               -> eval/<a>-vs-<b>/
    report             one HTML file                                  -> report.html

Each stage names the stages whose outputs it reads (`deps`) and the settings its result depends
on; together they make its fingerprint (see manifest.py). Each stage's work is an ordinary
`openrlaif` job (train, generate, label, ...) writing ordinary files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from openrlaif.cards import Source, dataset_card_path, describe_data, write_dataset_card
from openrlaif.config import answer_fields, format_validation_error, load_judge_config
from openrlaif.data.chat import encode_prompt, use_chat_template
from openrlaif.data.io import read_pairs
from openrlaif.data.records import PromptRecord, prompt_from_json
from openrlaif.data.refs import (
    data_fingerprint,
    demonstration_rows,
    materialize,
    pair_rows,
    prompt_rows,
)
from openrlaif.distill import distill, teacher_source
from openrlaif.errors import ConfigError
from openrlaif.evaluation.evaluate import EvalSettings, evaluate
from openrlaif.evaluation.human import import_labels
from openrlaif.evaluation.report import build_report, check_reward_model
from openrlaif.generation import GenerateConfig, generate
from openrlaif.judges import JudgmentCache, build_judge
from openrlaif.labeling import label_pairs, measure_alignment, print_undecided
from openrlaif.models.loading import load_model_config, load_tokenizer
from openrlaif.models.names import resolve_model_path
from openrlaif.pipeline.config import PipelineConfig

RESERVED_NAMES = {"base", "data", "eval", "rm", "report", "align"}


@dataclass
class Context:
    config: PipelineConfig
    run_dir: Path
    show_progress: bool = True

    @property
    def cache_path(self) -> Path:
        return Path(self.config.cache) if self.config.cache else self.run_dir / "judgments.sqlite3"

    def model_path(self, name: str) -> str:
        """`base`, a policy's name (its trained model folder), or a model path/id as is."""
        if name == "base":
            return resolve_model_path(self.config.model)
        if name in self.config.policies:
            return str(self.run_dir / name / "model")
        return name

    def open_judge(self, name: str) -> Any:
        return build_judge(load_judge_config(name), JudgmentCache(self.cache_path))


StageFn = Callable[[Context, bool], dict[str, Any]]  # (context, resume) -> a few numbers for the manifest


@dataclass
class Stage:
    name: str
    deps: list[str]  # stages whose outputs it reads
    settings: dict[str, Any]  # everything else its result depends on
    outputs: list[str]  # relative to the run dir; removed before a fresh run
    run: StageFn
    hashed: list[str] = field(default_factory=list)  # outputs later stages read (default: outputs)

    @property
    def hashed_outputs(self) -> list[str]:
        return self.hashed or self.outputs


def judge_settings(name: str) -> dict[str, Any]:
    """What of a judge changes its answers (not its batch size or URLs)."""
    return answer_fields(load_judge_config(name))


def stage_of_model(config: PipelineConfig, name: str) -> list[str]:
    """The stage that makes a policy (none for `base` or a model path)."""
    if name in config.policies:
        return [f"{config.policies[name].method}:{name}"]
    return []


def model_settings(config: PipelineConfig, name: str) -> str:
    return config.model if name == "base" else name if name not in config.policies else f"policy:{name}"


def trainer_config(algorithm: str, settings: dict[str, Any], where: str) -> Any:
    from openrlaif.training import TRAINERS  # why: start-up — training imports torch

    config_class = TRAINERS[algorithm][0]
    try:
        return config_class.model_validate(settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error(where, e)) from None


def tracked(ctx: Context, settings: dict[str, Any]) -> dict[str, Any]:
    """A trainer stage's settings with the run's trackers: the pipeline's `report_to` (unless the
    stage names its own), the experiment's name as the project, the run folder as the group (the
    run is named after the stage's output folder). None of it is in a fingerprint."""
    extra: dict[str, Any] = {"tracker_project": ctx.config.name, "tracker_group": ctx.run_dir.name}
    if ctx.config.report_to is not None:
        extra["report_to"] = ctx.config.report_to
    return extra | settings


def _train(
    algorithm: str, settings: dict[str, Any], where: str, ctx: Context, resume: bool
) -> dict[str, Any]:
    from openrlaif.training import run_trainer  # why: start-up — training imports torch

    config = trainer_config(algorithm, tracked(ctx, settings), where)
    result = run_trainer(algorithm, config, resume=resume, show_progress=ctx.show_progress)
    return {"steps": result.steps, **{k: round(v, 6) for k, v in (result.metrics or {}).items()}}


def fitting_prompts(
    rows: list[dict[str, Any]], model: str, max_new_tokens: int, revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """The prompts that leave room for `max_new_tokens` in the policy's context, and how many did
    not. Long HH dialogues exceed a small model's positions; they are left out (and counted in
    the stage's summary) rather than cut, because a dialogue cut from the left loses who said what."""
    config = load_model_config(model, revision, trust_remote_code)
    limit = next(
        (getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)),
        None,
    )
    if limit is None:
        return rows, 0
    tokenizer = load_tokenizer(model, revision, trust_remote_code)
    chat = use_chat_template(tokenizer, "auto")
    kept = [
        r
        for r in rows
        if len(encode_prompt(tokenizer, prompt_from_json(r["prompt"]), chat)) + max_new_tokens <= limit
    ]
    if not kept:
        raise ConfigError(f"no prompt fits {model}'s {limit} positions with max_new_tokens={max_new_tokens}")
    return kept, len(rows) - len(kept)


# ---------------------------------------------------------------- the plan


def plan(config: PipelineConfig) -> list[Stage]:
    for name in config.policies:
        if name in RESERVED_NAMES or "/" in name or name.startswith("."):
            raise ConfigError(
                f"policies: {name!r} cannot name a policy (reserved: {', '.join(sorted(RESERVED_NAMES))})"
            )
    stages: list[Stage] = []
    if config.align is not None:
        stages.append(align_stage(config))
    stages += [distill_stage(config, name) for name in _used_teachers(config)]
    for name in _policy_order(config, methods=("sft",)):
        stages.append(sft_stage(config, name))
    if config.uses_feedback or any(p.method == "rl" for p in config.policies.values()):
        if config.uses_feedback:
            stages += [candidates_stage(config), label_stage(config)]
        if config.uses_reward_model:
            stages.append(reward_model_stage(config))
    for name in _policy_order(config, methods=("rl", "dpo")):
        stages.append(
            rl_stage(config, name) if config.policies[name].method == "rl" else dpo_stage(config, name)
        )
    stages += [eval_stage(config, a, b) for a, b in config.eval.compare]
    if config.report:
        stages.append(report_stage(config, [s.name for s in stages]))
    return _in_dependency_order(stages)


def _used_teachers(config: PipelineConfig) -> list[str]:
    used = {
        p.data[len("distill:") :]
        for p in config.policies.values()
        if p.data and p.data.startswith("distill:")
    }
    return sorted(used)


def _policy_order(config: PipelineConfig, methods: tuple[str, ...]) -> list[str]:
    return [name for name, spec in config.policies.items() if spec.method in methods]


def _in_dependency_order(stages: list[Stage]) -> list[Stage]:
    """Stable topological order: a stage runs after every stage it reads from."""
    by_name = {s.name: s for s in stages}
    done: list[Stage] = []
    seen: set[str] = set()

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        if stage.name in seen:
            return
        if stage.name in path:
            raise ConfigError(f"pipeline: a cycle {' -> '.join([*path, stage.name])}")
        for dep in stage.deps:
            if dep not in by_name:
                raise ConfigError(
                    f"pipeline: stage {stage.name} needs {dep}, which this config does not make"
                )
            visit(by_name[dep], (*path, stage.name))
        seen.add(stage.name)
        done.append(stage)

    for stage in stages:
        visit(stage, ())
    return done


# ---------------------------------------------------------------- stages


def align_stage(config: PipelineConfig) -> Stage:
    spec = config.align
    assert spec is not None

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        pairs = materialize(
            pair_rows(spec.dataset, spec.limit, "align.dataset"),
            ctx.run_dir / "data" / "align-pairs.jsonl",
            "align.dataset",
        )
        metrics = measure_alignment(
            str(pairs), config.judge, ctx.run_dir / "align.json", labels_out=ctx.run_dir / "align.labels.jsonl",
            seed=config.seed, cache=str(ctx.cache_path), show_progress=ctx.show_progress,
        ).metrics  # fmt: skip
        print_undecided(metrics["job"]["undecided"], ctx.run_dir / "align.labels.jsonl")
        summary = {k: metrics[k] for k in ("pairs", "alignment", "same_position_preferred") if k in metrics}
        return summary | ({"undecided": metrics["job"]["undecided"]} if metrics["job"]["undecided"] else {})

    settings = {
        "dataset": data_fingerprint(spec.dataset),
        "limit": spec.limit,
        "judge": judge_settings(config.judge),
        "seed": config.seed,
    }
    return Stage(
        "align",
        [],
        settings,
        ["align.json", "align.labels.jsonl", "data/align-pairs.jsonl"],
        run,
        ["align.json"],
    )


def distill_stage(config: PipelineConfig, teacher: str) -> Stage:
    spec = config.teachers[teacher]
    out = f"data/distill-{teacher}.jsonl"

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        model = resolve_model_path(spec.model) if spec.model else None
        result = distill(
            teacher_source(model, spec.judge), spec.prompts, ctx.run_dir / out, spec.temperature,
            spec.max_new_tokens, spec.limit, config.seed, show_progress=ctx.show_progress,
        )  # fmt: skip
        return {"demonstrations": sum(1 for _ in result.open(encoding="utf-8"))}

    settings = spec.model_dump() | {"prompts": data_fingerprint(spec.prompts), "seed": config.seed}
    if spec.judge:
        settings["judge"] = judge_settings(spec.judge)
    stem = out.removesuffix(".jsonl")
    return Stage(
        f"distill:{teacher}",
        [],
        settings,
        [out, f"{stem}.samples.jsonl", f"{stem}.prompts.jsonl"],
        run,
        [out],
    )


def sft_stage(config: PipelineConfig, name: str) -> Stage:
    spec = config.policies[name]
    data = spec.data or "hh-harmless:train"
    deps = stage_of_model(config, spec.init)
    if data.startswith("distill:"):
        deps.append(data)

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        if data.startswith("distill:"):
            source = str(ctx.run_dir / f"data/{data.replace(':', '-')}.jsonl")
        else:
            rows = demonstration_rows(data, None, f"policies.{name}.data")
            source = str(
                materialize(rows, ctx.run_dir / "data" / f"sft-{name}.jsonl", f"policies.{name}.data")
            )
        settings = {"seed": config.seed, **spec.settings, "model": ctx.model_path(spec.init), "data": source,
                    "output_dir": str(ctx.run_dir / name)}  # fmt: skip
        return _train("sft", settings, f"policies.{name}.settings", ctx, resume)

    settings = {
        "init": model_settings(config, spec.init),
        "data": data_fingerprint(data),
        "train": spec.settings,
        "seed": config.seed,
    }
    return Stage(f"sft:{name}", deps, settings, [name, f"data/sft-{name}.jsonl"], run, [f"{name}/model"])


def candidates_stage(config: PipelineConfig) -> Stage:
    spec = config.feedback

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        policy = ctx.model_path(spec.policy)
        rows, too_long = fitting_prompts(
            prompt_rows(spec.prompts, None, "feedback.prompts"), policy, spec.max_new_tokens
        )
        rows = rows[: spec.limit]
        prompts = materialize(rows, ctx.run_dir / "data" / "feedback-prompts.jsonl", "feedback.prompts")
        gen = GenerateConfig(
            policy=policy, prompts=str(prompts), num_responses=spec.num_responses,
            temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, seed=config.seed,
            out=str(ctx.run_dir / "candidates.jsonl"), pairs_out=str(ctx.run_dir / "pairs.jsonl"),
            pairs_per_prompt=spec.pairs_per_prompt,
        )  # fmt: skip
        result = generate(gen, show_progress=ctx.show_progress)
        if result.pairs == 0:
            raise ConfigError("feedback: the policy's samples gave no pairs of distinct, non-empty responses")
        return {
            "prompts": result.prompts,
            "too_long": too_long,
            "samples": result.samples,
            "pairs": result.pairs,
        }

    settings = {
        "policy": model_settings(config, spec.policy), "prompts": data_fingerprint(spec.prompts),
        "sampling": spec.model_dump(include={"limit", "num_responses", "pairs_per_prompt", "temperature", "max_new_tokens"}),
        "seed": config.seed,
    }  # fmt: skip
    outputs = ["candidates.jsonl", "pairs.jsonl", "data/feedback-prompts.jsonl"]
    return Stage("candidates", stage_of_model(config, spec.policy), settings, outputs, run, ["pairs.jsonl"])


def label_stage(config: PipelineConfig) -> Stage:
    human = config.feedback.human_labels

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        pairs = read_pairs(ctx.run_dir / "pairs.jsonl").records
        judge = ctx.open_judge(config.judge)
        out = ctx.run_dir / ("labeled.ai.jsonl" if human else "labeled.jsonl")
        try:
            job = label_pairs(pairs, judge, out, show_progress=ctx.show_progress)
        finally:
            judge.close()
        summary: dict[str, Any] = {"pairs": job.total, "cache_hits": job.cache_hits}
        if job.undecided:  # left out of the labels the reward model / DPO learn from
            summary["undecided"] = job.undecided
            print_undecided(job.undecided, out)
        if human:
            imported = import_labels(out, human, ctx.run_dir / "labeled.jsonl")
            summary["human_labels"] = imported.human
        write_dataset_card(ctx.run_dir / "labeled.jsonl", feedback_source(config), config.judge)
        return summary

    settings: dict[str, Any] = {"judge": judge_settings(config.judge)}
    if human:
        settings["human_labels"] = data_fingerprint(human)
    outputs = ["labeled.jsonl", "labeled.ai.jsonl", str(dataset_card_path("labeled.jsonl"))]
    return Stage("label", ["candidates"], settings, outputs, run, ["labeled.jsonl"])


def feedback_source(config: PipelineConfig) -> Source:
    """What the AI-labeled pairs are, for the cards: the feedback policy's samples on its prompts."""
    spec = config.feedback
    prompts = describe_data(spec.prompts)
    note = (f"`labeled.jsonl`: pairs of `{spec.policy}`'s samples ({spec.num_responses} per prompt, temperature "
            f"{spec.temperature}) on the prompts {prompts.note}, labeled by the judge `{config.judge}` in both orders")  # fmt: skip
    if spec.human_labels:
        note += "; people's labels replace the AI's where given"
    return Source("labeled.jsonl", prompts.hub_id, prompts.license, note)


def reward_model_stage(config: PipelineConfig) -> Stage:
    spec = config.feedback

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        settings = {"seed": config.seed, "model": ctx.model_path(spec.policy), **spec.reward_model,
                    "data": str(ctx.run_dir / "labeled.jsonl"), "output_dir": str(ctx.run_dir / "rm")}  # fmt: skip
        if "model" in spec.reward_model:
            settings["model"] = resolve_model_path(spec.reward_model["model"])
        summary = _train("rm", settings, "feedback.reward_model", ctx, resume)
        _say_reward_model_check(summary, ctx)
        return summary

    settings = {"init": model_settings(config, spec.policy), "train": spec.reward_model, "seed": config.seed}
    return Stage(
        "reward_model", ["label", *stage_of_model(config, spec.policy)], settings, ["rm"], run, ["rm/model"]
    )


def _say_reward_model_check(summary: dict[str, Any], ctx: Context) -> None:
    """Whether the reward model learned the labels, said as soon as it is known; a reward model
    that did not is said even with --quiet (the RL after it would follow noise)."""
    check = check_reward_model("rm", summary.get("eval/accuracy"), summary.get("eval/pairs"))
    if check is not None and (ctx.show_progress or not check.learned):
        print(("" if check.learned else "warning: ") + check.sentence(), file=sys.stderr, flush=True)


def rl_stage(config: PipelineConfig, name: str) -> Stage:
    spec = config.policies[name]
    prompts = spec.data or config.feedback.prompts
    deps = stage_of_model(config, spec.init)
    settings: dict[str, Any] = {"init": model_settings(config, spec.init), "prompts": data_fingerprint(prompts),
                                "reward": spec.reward, "train": spec.settings, "seed": config.seed}  # fmt: skip
    if spec.reward == "reward_model":
        deps.append("reward_model")
    else:
        settings["judge"] = judge_settings(config.judge)

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        from openrlaif.training.rl import RLBaseConfig  # why: start-up — training imports torch

        max_new = spec.settings.get("max_new_tokens", RLBaseConfig.model_fields["max_new_tokens"].default)
        rows, too_long = fitting_prompts(
            prompt_rows(prompts, None, f"policies.{name}.data"),
            ctx.model_path(spec.init),
            max_new,
            spec.settings.get("revision"),
            spec.settings.get("trust_remote_code", False),
        )
        source = materialize(rows, ctx.run_dir / "data" / f"rl-{name}-prompts.jsonl", f"policies.{name}.data")
        if spec.reward == "reward_model":
            reward: dict[str, Any] = {"type": "reward_model", "path": str(ctx.run_dir / "rm" / "model")}
        else:
            reward = {"type": spec.reward, "judge": config.judge}
        train = {"seed": config.seed, **spec.settings, "model": ctx.model_path(spec.init), "data": str(source),
                 "reward": spec.settings.get("reward", {}) | reward, "output_dir": str(ctx.run_dir / name)}  # fmt: skip
        return {"prompts": len(rows), "too_long": too_long} | _train(
            "rl", train, f"policies.{name}.settings", ctx, resume
        )

    return Stage(
        f"rl:{name}", deps, settings, [name, f"data/rl-{name}-prompts.jsonl"], run, [f"{name}/model"]
    )


def dpo_stage(config: PipelineConfig, name: str) -> Stage:
    spec = config.policies[name]

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        train = {"seed": config.seed, **spec.settings, "model": ctx.model_path(spec.init),
                 "data": str(ctx.run_dir / "labeled.jsonl"), "output_dir": str(ctx.run_dir / name)}  # fmt: skip
        return _train("dpo", train, f"policies.{name}.settings", ctx, resume)

    settings = {"init": model_settings(config, spec.init), "train": spec.settings, "seed": config.seed}
    return Stage(
        f"dpo:{name}", ["label", *stage_of_model(config, spec.init)], settings, [name], run, [f"{name}/model"]
    )


# Every comparison's policy samples, keyed by weights and sampling settings: a policy in several
# comparisons (SFT against RLAIF and against d-RLAIF) is sampled once.
EVAL_RESPONSES = "eval/responses"


def eval_dir(a: str, b: str) -> str:
    return f"eval/{a}-vs-{b}"


def eval_stage(config: PipelineConfig, a: str, b: str) -> Stage:
    spec = config.eval
    judge = spec.judge or config.judge
    out = eval_dir(a, b)

    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        rows = prompt_rows(spec.prompts, None, "eval.prompts")
        too_long = 0
        for side in dict.fromkeys([ctx.model_path(a), ctx.model_path(b)]):  # both must fit
            rows, dropped = fitting_prompts(rows, side, spec.max_new_tokens)
            too_long += dropped
        prompts = [PromptRecord(r["id"], prompt_from_json(r["prompt"])) for r in rows[: spec.limit]]
        settings = EvalSettings(
            temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, seed=config.seed,
            harmless_threshold=spec.harmless_threshold, bootstrap_seed=config.seed,
        )  # fmt: skip
        judge_ = ctx.open_judge(judge)
        try:
            result = evaluate(
                ctx.model_path(a), ctx.model_path(b), prompts, judge_, ctx.run_dir / out, name_a=a, name_b=b,
                settings=settings, show_progress=ctx.show_progress, responses_dir=ctx.run_dir / EVAL_RESPONSES,
            )  # fmt: skip
        finally:
            judge_.close()
        return {"prompts": len(prompts), "too_long": too_long, "win_rate": result["win_rate"]["value"],
                "ci95": result["win_rate"]["ci95"]}  # fmt: skip

    settings = {
        "a": model_settings(config, a), "b": model_settings(config, b), "judge": judge_settings(judge),
        "prompts": data_fingerprint(spec.prompts), "sampling": spec.model_dump(exclude={"compare", "judge", "prompts"}),
        "seed": config.seed,
    }  # fmt: skip
    return Stage(
        f"eval:{a}-vs-{b}", [*stage_of_model(config, a), *stage_of_model(config, b)], settings, [out], run
    )


def report_stage(config: PipelineConfig, before: list[str]) -> Stage:
    def run(ctx: Context, resume: bool) -> dict[str, Any]:
        return {"report": str(build_report(ctx.run_dir))}

    # every earlier stage: the report shows their curves and numbers (the trackers are not in it)
    settings = {"config": config.model_dump(mode="json", exclude={"report_to"})}
    return Stage("report", before, settings, ["report.html"], run)

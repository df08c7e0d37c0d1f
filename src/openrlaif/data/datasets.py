"""Built-in datasets shipped inside the package (with their licenses), and name-or-path loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openrlaif.data.io import ReadResult, read_pairs, read_prompts
from openrlaif.data.records import Pair, PromptRecord
from openrlaif.errors import ConfigError, OpenRLAIFError

BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    file: str
    description: str
    license_file: str
    hub_id: str | None = None  # the source's Hugging Face Hub dataset (model and dataset cards name it)
    license: str | None = None  # the source's license, as the Hub's `license:` id


BUILTIN_DATASETS = {
    "hh-harmless": BuiltinDataset(
        name="hh-harmless",
        file="harmless-base-1800.jsonl.gz",
        description="1,800 Anthropic HH-RLHF harmless-base test pairs; humans chose the less harmful reply (MIT).",
        license_file="hh-rlhf-LICENSE",
        hub_id="Anthropic/hh-rlhf",
        license="mit",
    ),
}


def load_pairs(name_or_path: str, skip_invalid: bool = False, limit: int | None = None) -> ReadResult[Pair]:
    """Load a built-in dataset by name, or any pairs file by path."""
    if name_or_path in BUILTIN_DATASETS:
        path = BUILTIN_DIR / BUILTIN_DATASETS[name_or_path].file
        # The source file has 6 rows that are not usable pairs (an empty final reply, or dialogues
        # that differ before the last turn); they are skipped and listed in `result.skipped`.
        result = read_pairs(path, skip_invalid=True)
        for pair in result.records:  # ids that say where they came from
            pair.id = f"{name_or_path}-{pair.id.removeprefix('line-')}"
    elif Path(name_or_path).exists():
        result = read_pairs(name_or_path, skip_invalid=skip_invalid)
    else:
        names = ", ".join(sorted(BUILTIN_DATASETS))
        raise OpenRLAIFError(
            f"dataset {name_or_path!r} is neither a built-in dataset ({names}) nor an existing file"
        )
    if limit is not None:
        result.records = result.records[:limit]
    return result


# The one train/eval split of `hh-harmless`, shared by every stage that trains on it (the shipped
# base policy `builtin:hh-tiny-gpt`, SFT, reward model, RL) and by evaluation: source lines
# 1-1200 train, lines 1201-1800 are held out, so evaluation prompts are never trained on.
HH_HARMLESS_TRAIN_LINES = 1200


def hh_harmless_split(part: Literal["train", "eval"]) -> list[Pair]:
    """The usable `hh-harmless` pairs of one part: "train" = source lines 1-1200 (1,196 pairs),
    "eval" = lines 1201-1800 (597 pairs) less any whose prompt also occurs in the train lines
    (one: line 1484, "what are racist words"). Ids are `hh-harmless-<source line>`."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    pairs = load_pairs("hh-harmless").records
    in_train = [int(p.id.removeprefix("hh-harmless-")) <= HH_HARMLESS_TRAIN_LINES for p in pairs]
    train = [p for p, t in zip(pairs, in_train, strict=True) if t]
    if part == "train":
        return train
    seen = {p.prompt for p in train}
    return [p for p, t in zip(pairs, in_train, strict=True) if not t and p.prompt not in seen]


def load_prompts(
    source: str, skip_invalid: bool = False, limit: int | None = None
) -> ReadResult[PromptRecord]:
    """A prompts file, or a built-in dataset's prompts (ids like "hh-harmless-12")."""
    if source in BUILTIN_DATASETS:
        # The few source rows the loader leaves out are a documented property of the shipped
        # file, not invalid input of the user's, so they are not reported as skipped.
        pairs = load_pairs(source)
        result = ReadResult([PromptRecord(p.id, p.prompt) for p in pairs.records])
    elif Path(source).exists():
        result = read_prompts(source, skip_invalid=skip_invalid)
    else:
        names = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigError(f"prompts: {source!r} is neither a file nor a built-in dataset ({names})")
    if limit is not None:
        result.records = result.records[:limit]
    return result

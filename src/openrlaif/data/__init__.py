"""Record schemas, readers/writers and built-in datasets."""

from openrlaif.data.datasets import BUILTIN_DATASETS, load_pairs
from openrlaif.data.records import (
    JudgeIdentity,
    LabeledPair,
    Pair,
    PromptRecord,
    ResponseRecord,
    ScoredResponse,
)

__all__ = [
    "BUILTIN_DATASETS",
    "JudgeIdentity",
    "LabeledPair",
    "Pair",
    "PromptRecord",
    "ResponseRecord",
    "ScoredResponse",
    "load_pairs",
]

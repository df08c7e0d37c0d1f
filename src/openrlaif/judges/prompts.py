"""Judge prompts, structured as in the RLAIF paper (Lee et al., 2023, §2.1 of DESIGN.md).

Pairwise prompt = preamble + optional few-shot exemplars + the sample (context, Response 1,
Response 2) + ending (`Preferred Response=`). The preamble and exemplars are the same for every
pair, so they form a shared *prefix* that a local model encodes once; everything after is the
per-pair *suffix*. Chain of thought replaces the ending with an instruction to explain, and
the second step appends the rationale and the normal ending.

Direct (d-RLAIF) prompt = an expert-rater instruction + context + response + `SCORE: `.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from openrlaif.config import StrictModel, load_yaml_model
from openrlaif.errors import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"


class Exemplar(StrictModel):
    """A worked example for few-shot prompting."""

    context: str
    response_1: str
    response_2: str
    label: Literal["1", "2"]
    rationale: str | None = None


class PairwiseTemplate(StrictModel):
    preamble: str
    exemplars: list[Exemplar] = Field(default_factory=list)
    sample: str = "Context - {context}\nResponse 1 - {response_1}\nResponse 2 - {response_2}\n"
    ending: str = "Preferred Response="
    cot_instruction: str = (
        "Consider the quality of each response and explain which one is better.\nRationale:"
    )
    labels: tuple[str, str] = ("1", "2")

    def prefix(self) -> str:
        """Preamble and exemplars: identical for every pair."""
        parts = [self.preamble.rstrip("\n") + "\n\n"]
        for ex in self.exemplars:
            sample = self.sample.format(
                context=ex.context, response_1=ex.response_1, response_2=ex.response_2
            )
            parts.append(sample)
            if ex.rationale:
                parts.append(f"{self.cot_instruction} {ex.rationale.strip()}\n")
            parts.append(f"{self.ending}{ex.label}\n\n")
        return "".join(parts)

    def suffix(self, context: str, first: str, second: str, rationale: str | None = None) -> str:
        """The per-pair part, ending where the label token is read. With a rationale (step 2
        of chain of thought) the rationale sits between the sample and the ending."""
        sample = self.sample.format(
            context=context.strip(), response_1=first.strip(), response_2=second.strip()
        )
        if rationale is None:
            return sample + self.ending
        return f"{sample}{self.cot_instruction} {rationale.strip()}\n{self.ending}"

    def cot_suffix(self, context: str, first: str, second: str) -> str:
        """Step 1 of chain of thought: the sample followed by the request to explain."""
        sample = self.sample.format(
            context=context.strip(), response_1=first.strip(), response_2=second.strip()
        )
        return f"{sample}{self.cot_instruction}"

    def hash(self) -> str:
        return _hash(self)


class ScoreTemplate(StrictModel):
    instruction: str
    sample: str = "Context - {context}\nResponse - {response}\n"
    ending: str = "SCORE: "
    scores: tuple[str, ...] = tuple(str(i) for i in range(1, 11))

    def prefix(self) -> str:
        return self.instruction.rstrip("\n") + "\n\n"

    def suffix(self, context: str, response: str) -> str:
        return self.sample.format(context=context.strip(), response=response.strip()) + self.ending

    def hash(self) -> str:
        return _hash(self)


def _hash(model: BaseModel) -> str:
    canonical = json.dumps(model.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class TemplateSet(StrictModel):
    """What a template file holds: a pairwise template and a direct-score template."""

    pairwise: PairwiseTemplate
    score: ScoreTemplate


def builtin_template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def load_template_set(name_or_path: str) -> TemplateSet:
    """A built-in template set by name (`harmless`, `helpful`, `summarize`) or a YAML file."""
    path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(
            f"template {name_or_path!r} is neither a built-in template ({', '.join(builtin_template_names())}) nor a file"
        )
    return load_yaml_model(path, TemplateSet)


def render_pairwise(
    t: PairwiseTemplate, context: str, first: str, second: str, rationale: str | None = None
) -> str:
    """The whole prompt as one string (for servers and for reading)."""
    return t.prefix() + t.suffix(context, first, second, rationale)

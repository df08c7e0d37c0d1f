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
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from openrlaif.config import StrictModel, load_yaml_model, resolve_shipped_yaml
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
    # A constitution: `principles_per_judgment` of `principles`, drawn per pair (seeded by the pair
    # and `principles_seed`, the same in both orders, so the cache stays valid), shown right after
    # the sample, before the ending (in the per-pair part: the shared preamble's KV cache and the
    # shared context of several responses are still reused)
    principles: list[str] = Field(default_factory=list)
    principles_per_judgment: int = Field(0, ge=0)
    principles_seed: int = 0
    principles_intro: str = "For this comparison, weigh these principles:\n"

    def principles_for(self, context: str, first: str, second: str) -> list[str]:
        """The principles shown with this pair (none without a constitution): a seeded draw that
        does not depend on the order of the two responses, in the constitution's own order."""
        k = min(self.principles_per_judgment, len(self.principles))
        if k == 0:
            return []
        pair = sorted((first.strip(), second.strip()))
        key = json.dumps([self.principles_seed, context.strip(), *pair], ensure_ascii=False)
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        return [self.principles[i] for i in sorted(rng.sample(range(len(self.principles)), k))]

    def _principles_block(self, context: str, first: str, second: str) -> str:
        chosen = self.principles_for(context, first, second)
        return self.principles_intro + "".join(f"- {p}\n" for p in chosen) + "\n" if chosen else ""

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
        sample += self._principles_block(context, first, second)  # a constitution's, if any
        if rationale is None:
            return sample + self.ending
        return f"{sample}{self.cot_instruction} {rationale.strip()}\n{self.ending}"

    def cot_suffix(self, context: str, first: str, second: str) -> str:
        """Step 1 of chain of thought: the sample followed by the request to explain."""
        sample = self.sample.format(
            context=context.strip(), response_1=first.strip(), response_2=second.strip()
        )
        return f"{sample}{self._principles_block(context, first, second)}{self.cot_instruction}"

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


CONSTITUTION_DIR = Path(__file__).parent / "constitutions"


class Constitution(StrictModel):
    principles: list[str] = Field(min_length=1)


def load_principles(spec: list[str] | str) -> list[str]:
    """A constitution's principles: a list as given, a shipped one by name (`harmless`), or a
    YAML file holding `principles: [...]`."""
    if isinstance(spec, list):
        return spec
    return load_yaml_model(
        resolve_shipped_yaml(spec, CONSTITUTION_DIR, "constitution"), Constitution
    ).principles


def load_judge_templates(
    template: str, principles: list[str] | str | None = None, per_judgment: int = 1, seed: int = 0
) -> TemplateSet:
    """A judge's templates: `load_template_set(template)`, with the constitution's principles on
    its pairwise template when `principles` is set (drawn `per_judgment` at a time)."""
    templates = load_template_set(template)
    if principles is None:
        return templates
    listed = load_principles(principles)
    if per_judgment > len(listed):
        raise ConfigError(
            f"principles_per_judgment {per_judgment} is more than the {len(listed)} principles given"
        )
    pairwise = templates.pairwise.model_copy(
        update={"principles": listed, "principles_per_judgment": per_judgment, "principles_seed": seed}
    )
    return templates.model_copy(update={"pairwise": pairwise})


def render_pairwise(
    t: PairwiseTemplate, context: str, first: str, second: str, rationale: str | None = None
) -> str:
    """The whole prompt as one string (for servers and for reading)."""
    return t.prefix() + t.suffix(context, first, second, rationale)

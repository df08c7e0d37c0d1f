"""The anchor responses of `reward: {type: judge_pairwise, comparisons: anchor}`: one per prompt,
which every sample of that prompt is compared with (in both orders).

`anchor: reference` (default): the reference policy's greedy answer (the SFT policy's, as the
judge's yardstick), made the first time a prompt comes up and appended to
`output_dir/anchors.rank{r}.jsonl`, so a resumed run reuses them instead of generating again.
`anchor: FILE`: a responses file (`openrlaif generate`'s rows, or any with `id`, `prompt`,
`response`), matched to the RL prompts by prompt text; its first response per prompt is taken.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from openrlaif.data.io import read_jsonl_dicts, read_responses
from openrlaif.data.records import Prompt, PromptRecord, prompt_from_json, prompt_json
from openrlaif.errors import ConfigError

REFERENCE = "reference"


class Anchors:
    """`for_prompts(prompts, greedy)`: each prompt's anchor; `greedy(prompts)` writes the missing
    ones when the anchors are the reference policy's."""

    def __init__(self, source: str, output_dir: Path, rank: int) -> None:
        self.source = source
        self.by_prompt: dict[Prompt, str] = {}
        self.file = output_dir / f"anchors.rank{rank}.jsonl"
        if source != REFERENCE:
            if not Path(source).is_file():
                raise ConfigError(f"reward.anchor: {source!r} is neither `reference` nor a responses file")
            for record in read_responses(source).records:
                self.by_prompt.setdefault(record.prompt, record.response)
            return
        for done in sorted(output_dir.glob("anchors.rank*.jsonl")):  # a resumed run's
            for row in read_jsonl_dicts(done):
                self.by_prompt[prompt_from_json(row["prompt"])] = row["response"]

    def for_prompts(
        self, prompts: Sequence[PromptRecord], greedy: Callable[[list[PromptRecord]], list[str]]
    ) -> list[str]:
        missing = list({p.prompt: p for p in prompts if p.prompt not in self.by_prompt}.values())
        if missing and self.source != REFERENCE:
            raise ConfigError(f"reward.anchor: {self.source} has no response to prompt {missing[0].id!r}")
        if missing:
            made = greedy(missing)
            with self.file.open("a", encoding="utf-8") as out:  # flushed per step: a resume keeps them
                for p, text in zip(missing, made, strict=True):
                    self.by_prompt[p.prompt] = text
                    out.write(
                        json.dumps({"id": p.id, "prompt": prompt_json(p.prompt), "response": text}) + "\n"
                    )
        return [self.by_prompt[p.prompt] for p in prompts]

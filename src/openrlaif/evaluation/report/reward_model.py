"""Did the reward model learn the labels it was trained on? The check the report and the pipeline
lead with: RL against a reward model at chance follows noise, not the judge."""

from __future__ import annotations

import math
from dataclasses import dataclass

from openrlaif.evaluation.report.load import RunData, TrainerLog
from openrlaif.evaluation.report.text import ci_text, pct
from openrlaif.evaluation.winrate import proportion_ci


@dataclass
class RewardModelCheck:
    """Did the reward model learn the labels it was trained on? Its held-out accuracy against
    the labels' argmax (pairs of prompts it never trained on), with a Wilson 95% interval."""

    folder: str
    accuracy: float
    pairs: int
    ci95: tuple[float, float]
    before: float | None  # the same accuracy before training (step 0)

    @property
    def learned(self) -> bool:
        return self.ci95[0] > 0.5

    def sentence(self) -> str:
        numbers = f"held-out accuracy {pct(self.accuracy)} {ci_text(self.ci95)} on {self.pairs} pairs"
        if self.learned:
            return f"The reward model ({self.folder}/) learned the labels: {numbers}."
        return (
            f"The reward model ({self.folder}/) did not learn the labels: {numbers}, not clearly above "
            "chance. RL against it follows noise, not the judge; more or clearer feedback pairs, or more "
            "reward-model steps, are needed."
        )


def check_reward_model(
    folder: str, accuracy: float | None, pairs: float | None, before: float | None = None
) -> RewardModelCheck | None:
    """None when the numbers are not there (no held-out pairs)."""
    if accuracy is None or not pairs or not math.isfinite(accuracy):
        return None
    n = int(pairs)
    return RewardModelCheck(folder, accuracy, n, proportion_ci(accuracy * n, n), before)


def reward_model_check(trainer: TrainerLog) -> RewardModelCheck | None:
    """From a reward-model trainer's metrics: the last held-out accuracy and its pair count."""
    if trainer.kind != "rm":
        return None
    steps, values = trainer.steps("eval/accuracy")
    before = values[0] if steps and steps[0] == 0 else None
    return check_reward_model(
        trainer.folder, trainer.last("eval/accuracy"), trainer.last("eval/pairs"), before
    )


def reward_model_checks(run: RunData) -> list[RewardModelCheck]:
    """The check of every reward-model trainer folder of the run that has held-out numbers."""
    return [c for t in run.trainers if (c := reward_model_check(t)) is not None]

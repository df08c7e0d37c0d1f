"""The settings every RL algorithm shares (`RLBaseConfig`), where rewards come from
(`RewardSource`), and the settings of the algorithms with a value model (`ValueModelConfig`).
Each algorithm's own config is in its file (reinforce.py, rloo.py, ppo.py, online_dpo.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from openrlaif.config import StrictModel
from openrlaif.data.chat import ChatTemplate
from openrlaif.inference.server import RolloutServerConfig
from openrlaif.training.config import TrainConfig


class RewardSource(StrictModel):
    """Where rewards come from: a trained reward model, or a judge (d-RLAIF score or pairwise)."""

    type: Literal["reward_model", "judge_score", "judge_pairwise"]
    path: str | None = None  # reward_model: the folder `openrlaif train rm` wrote
    judge: str | None = None  # judge_*: a shipped judge name or a judge YAML file
    batch_size: int = Field(16, ge=1)  # reward-model scoring batch
    # reward_model: bf16 autocast or none; auto: bf16 where the hardware runs it natively
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # judge_pairwise: which samples of a prompt the judge compares (each pair in both orders):
    # all_pairs K(K-1) judgments per prompt; anchor: each sample against one anchor response, 2K;
    # round_robin: each sample against the next `rounds` samples
    comparisons: Literal["all_pairs", "anchor", "round_robin"] = "all_pairs"
    rounds: int = Field(1, ge=1)  # round_robin
    # anchor: `reference` (the reference policy's greedy answer, made once per prompt and kept in
    # output_dir/anchors*.jsonl) or a responses file (`openrlaif generate`'s: prompt_id, response)
    anchor: str = "reference"
    # judge_*: a SQLite judgment cache (`openrlaif label`'s format): judgments made before (a
    # resumed step, the gold pairs and canaries judged again, another run's) are read, not redone.
    # None: no cache (a cached value can differ in the last bits from one computed in another batch)
    cache: str | None = None

    @model_validator(mode="after")
    def _check(self) -> RewardSource:
        if self.type == "reward_model" and not self.path:
            raise ValueError("reward type reward_model needs `path` (a folder from `openrlaif train rm`)")
        if self.type != "reward_model" and not self.judge:
            raise ValueError(f"reward type {self.type} needs `judge` (a judge name or YAML file)")
        if self.type != "judge_pairwise" and self.comparisons != "all_pairs":
            raise ValueError(f"`comparisons` is a setting of reward type judge_pairwise, not {self.type}")
        return self


class RLBaseConfig(TrainConfig):
    """RL settings every algorithm shares (the trainers' shared ones are documented on
    TrainConfig). `model` is the SFT policy, which is also the frozen reference and the value
    model's starting point; `data` holds the prompts; `batch_size` is prompts per process per
    step, each sampled `num_samples` times."""

    method: ClassVar[str] = "rl"
    algorithm: str  # each algorithm's config narrows it to its name
    # how many samples per prompt the algorithm needs (it compares each sample with the others: 2)
    min_samples: ClassVar[int] = 1
    uses_value_model: ClassVar[bool] = False  # a learned V(s_t), trained beside the policy
    # One optimizer step per rollout: the training forward then also gives the old log-probs (the
    # same weights and inputs), and rows of one prompt may share its encoding. PPO takes several.
    one_update_per_rollout: ClassVar[bool] = True

    data: str = "hh-harmless"
    reward: RewardSource
    ref_model: str | None = None  # the KL reference; default: `model`
    beta: float = Field(0.05, ge=0.0, le=1.0)  # J = (1-β)·r - β·KL
    num_samples: int = Field(4, ge=1)  # K responses per prompt
    temperature: float = Field(0.9, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, ge=1)
    chat_template: ChatTemplate = "auto"
    generation_batch_size: int = Field(32, ge=1)
    # Sample through an OpenAI-compatible server (vLLM, SGLang) instead of in process; the
    # trainer saves the policy for it to reload every `rollout_server.sync_every` steps
    rollout_server: RolloutServerConfig | None = None
    learning_rate: float = Field(1e-6, gt=0.0)
    whiten_advantages: bool = False  # normalise advantages to mean 0, std 1 over the batch
    # Standardise each step's rewards (mean 0, std 1 over the batch of every process) before the
    # KL penalty: β then weighs KL against a reward of unit scale. A weakly confident judge or a
    # reward model trained on its soft labels gives rewards that differ by a few hundredths,
    # which β·KL would outweigh from the first steps. The logged reward stays the raw one.
    normalize_rewards: bool = False
    # Minibatches per pass over a rollout, for an algorithm that takes several optimizer steps
    # per rollout (PPO); one that updates once per rollout takes the whole rollout as one.
    num_minibatches: int = Field(2, ge=1)
    # Keep only each transformer layer's input in the training forward and run the layer again in
    # the backward: activation memory of one layer instead of all, for one more forward of compute
    # (RL's memory peak is that forward over batch_size x num_samples sequences). TRL's default too.
    gradient_checkpointing: bool = True
    # Compute GPT-2's `gelu_new` (eight element-wise operations, each output kept for the backward)
    # with PyTorch's fused tanh-GELU: the same function in one kernel (transformers'
    # gelu_pytorch_tanh; float rounding apart), less activation memory and time. Other models: no-op.
    fused_activations: bool = True
    # Judge diagnostics (training/rl/diagnostics.py), as `judge/*` metrics every N steps (0: off):
    # order flips and decisiveness of judge_pairwise's comparisons, the reward-length correlation,
    # and with `gold_pairs` (pairs with human labels, e.g. hh-harmless:eval) the reward source's
    # agreement with people on the first `gold_limit` of them (also before the first step)
    judge_diagnostics_every: int = Field(1, ge=0)
    gold_pairs: str | None = None
    gold_limit: int | None = Field(100, ge=1)
    # Guards against gaming the reward (training/rl/guards.py): a length penalty λ·tokens/max_new_tokens,
    # a length-controlled reward (length regressed out over the batch), and canaries (degenerate
    # responses scored on the step's prompts at the first step and every `canary_every` steps; 0: off)
    length_penalty: float = Field(0.0, ge=0.0)
    length_controlled: bool = False
    canary_every: int = Field(10, ge=0)
    canary_action: Literal["warn", "stop"] = "warn"  # a canary above the samples' median reward
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # RL holds no prompts out
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> RLBaseConfig:
        if self.num_samples < self.min_samples:
            raise ValueError(
                f"algorithm {self.algorithm} needs num_samples >= {self.min_samples} "
                "(each sample is compared with the others)"
            )
        if self.reward.type == "judge_pairwise" and self.num_samples < 2:
            raise ValueError("reward type judge_pairwise needs num_samples >= 2 (samples are compared)")
        self.check_micro_batches()
        return self

    def check_micro_batches(self) -> None:
        """Accumulation splits each step's rollout into micro-batches of whole prompts: every one
        needs a prompt."""
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(
                f"grad_accum_steps {self.grad_accum_steps} splits each step's {self.batch_size} prompts into "
                "micro-batches of whole prompts: it must be at most batch_size"
            )


class ValueModelConfig(RLBaseConfig):
    """Settings of the algorithms with a value model: a separate copy of the SFT model's body with
    a scalar head on every position (`TokenValueModel`), trained beside the policy by the same
    optimizer."""

    uses_value_model: ClassVar[bool] = True

    value_learning_rate: float | None = Field(None, gt=0.0)  # default: learning_rate
    value_loss_coef: float = Field(0.5, ge=0.0)

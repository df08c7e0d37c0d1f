"""RL from AI feedback (DESIGN §2.3-2.4): REINFORCE with a learned baseline, RLOO, PPO, online
DPO and GRPO, one file each, around one loop.

The objective (the paper's, β = 0.05 by default):

    J(θ) = E[(1 - β) · r(x, y) - β · KL(π_θ(·|x) ‖ π_ref(·|x))]

where π_ref is the frozen SFT model the policy starts from. Every step:

1. take `batch_size` prompts per process (sharded across processes like the other trainers);
2. sample `num_samples` (K) responses per prompt from the current policy (`inference.local.sample`,
   temperature 0.9, a new seed each step), in process or through an OpenAI-compatible server
   (`rollout_server`: vLLM, SGLang) that reloads the policy from disk every `sync_every` steps;
3. reward each response, from `reward.type`:
   - `reward_model`: a model trained with `openrlaif train rm` (it re-tokenizes the decoded text,
     so it may use another tokenizer than the policy);
   - `judge_score` (d-RLAIF, §2.4): the judge's direct score in [-1, 1], no reward model;
   - `judge_pairwise`: each sample's win rate in [0, 1] against the other K-1 samples of its
     prompt (the judge's P(win), both orders averaged, via `judge.compare_many`);
4. log-probs of the sampled response tokens under the policy and the reference; the per-token
   KL estimate is kl_t = log π(y_t) - log π_ref(y_t) (its sum over the response is an unbiased
   estimate of the sequence KL; a single batch's mean can be slightly negative);
5. shape the reward per token: r_t = -β · kl_t at every response token, plus (1 - β) · r at the
   final one (γ = 1: the return of the whole response is (1 - β)·r - β·KL, the objective);
6. one update, by `algorithm` (a pydantic config per algorithm, picked by `algorithm:`, default
   `reinforce`; a setting of another algorithm is an error):
   - `reinforce` (the paper's): returns G_t = Σ_{s≥t} r_s, advantage A_t = G_t - V(s_t) from a
     learned value model, policy loss -mean_t(A_t · log π(y_t)), value loss ½·mean_t(V - G)².
     The value model is a separate copy of the SFT model's transformer body with a scalar head on
     every position (`TokenValueModel`, initialised from SFT as in the paper; not shared with the
     policy, so the value loss cannot disturb the policy's representation);
   - `rloo`: the sequence return R_i = (1 - β)·r_i - β·KL_i, baseline = the mean of R over the
     other K-1 samples of the same prompt, loss -mean_i((R_i - b_i) · Σ_t log π(y_i,t)); no value
     model;
   - `ppo`: GAE(γ, λ) advantages from the value model, `ppo_epochs` passes over the rollout in
     `num_minibatches` minibatches, each an optimizer step on the clipped surrogate
     max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) (ρ = π/π_old per token) plus the clipped value loss;
   - `online_dpo`: of each prompt's K fresh samples, the one with the highest reward is chosen
     and the lowest rejected (with `judge_pairwise`, the judge's win rates pick them); the sigmoid
     DPO loss -log σ(β_dpo·Δ) against the reference (`dpo_beta` takes the KL penalty's place;
     prompts whose samples all tie are skipped);
   - `grpo`: group-normalised advantages (R_i - mean of its prompt's K) / std (of the group, the
     batch, or none: Dr. GRPO) on every token, the clipped surrogate with optional clip-higher,
     tokens aggregated per sequence or per token (DAPO), the KL in the reward (the paper's) or as
     a k3 loss term, `num_iterations` passes of `num_minibatches` steps per rollout.

One optimizer (AdamW) holds the policy's and the value model's parameters (the value model's
learning rate is `value_learning_rate`), with one schedule stepped once per RL step; dropout is
off (the update's log-probs are those the samples were drawn from); `normalize_rewards`
standardises each step's rewards over the batch before the KL penalty (β then weighs KL against
a unit-scale reward), `whiten_advantages` normalises the advantages over the batch's tokens. `grad_accum_steps` splits each update into
micro-batches (of whole prompts; PPO: of each minibatch) whose losses are their shares of the
batch's, so the gradient is the same with less activation memory; `gradient_checkpointing`
(on by default) keeps only each transformer layer's input in the training forward, and
`fused_activations` computes GPT-2's tanh-GELU in one kernel. With one
update per rollout and no accumulation, the training forward also gives the old log-probs (the
same weights and inputs: a separate no-grad pass would compute the same numbers). Log-probs
are computed at the response positions only, and each prompt is encoded once for its K samples
in the reference and old-policy passes, and in the training pass too when its layers are not
checkpointed and one process trains (the gradient is the same; tested). A non-finite reward, KL or loss stops the run with
one line naming the step and the quantity; the last good checkpoint stays. Checkpoints hold
the policy, the value model (`value/`), the optimizer, scheduler, RNG states and the prompt
position; `--resume` continues exactly (with server rollouts, as exactly as the server samples).

Several processes: DDP (every algorithm, tested) and FSDP (the policy and the value model sharded
as one module, `updater.prepare_trained`; RLOO and REINFORCE tested); DeepSpeed untested.

    openrlaif train rl --config configs/train/rl-tiny.yaml [--resume] [--set algorithm=rloo]

Layout: `config.py` (the shared settings, the reward source, the value model's settings),
`rollout.py` (sampling, `Sequences`, log-probs, `score_rollout` -> `Rollout`), `rewards.py`,
`losses.py` (masked means, whitening, the value loss), `updater.py` (the optimizer and its step
over micro-batches), `loop.py` (`train_rl`), one file per algorithm (`reinforce.py`, `rloo.py`,
`ppo.py`, `online_dpo.py`, `grpo.py`: its config class, its advantages and loss, its `update`), and
`algorithms.py` (`ALGORITHMS` by name and `RLConfig`). The soft-label DPO loss online DPO uses is
the DPO trainer's (`training/losses.py`).

Adding an algorithm (say `myalgo`) is one file and one line:
1. `myalgo.py`: `class MyAlgoConfig(RLBaseConfig)` (or `ValueModelConfig` with a value model) with
   `algorithm: Literal["myalgo"] = "myalgo"`, its own settings, and the ClassVars that apply
   (`min_samples`, `one_update_per_rollout`); and `update(config, updater, rollout) -> losses`,
   which builds its advantages from the `Rollout` and calls `updater.step(micro_batches,
   loss_of, rollout.step, rollout.last_checkpoint)` (rloo.py is the shortest; grpo.py's `one_update_per_rollout` is a property of its settings);
2. in `algorithms.py`: `RLAlgorithm(myalgo.MyAlgoConfig, myalgo.update),` in `ALGORITHMS`.
"""

from openrlaif.training.rl.algorithms import ALGORITHMS, RLConfig
from openrlaif.training.rl.config import RewardSource, RLBaseConfig
from openrlaif.training.rl.grpo import GRPOConfig
from openrlaif.training.rl.loop import train_rl
from openrlaif.training.rl.online_dpo import OnlineDPOConfig
from openrlaif.training.rl.ppo import PPOConfig
from openrlaif.training.rl.reinforce import ReinforceConfig
from openrlaif.training.rl.rloo import RLOOConfig

__all__ = [
    "ALGORITHMS",
    "GRPOConfig",
    "OnlineDPOConfig",
    "PPOConfig",
    "RLBaseConfig",
    "RLConfig",
    "RLOOConfig",
    "ReinforceConfig",
    "RewardSource",
    "train_rl",
]

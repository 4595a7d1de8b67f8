"""`align grpo`: Group Relative Policy Optimization on TRL's GRPOTrainer, with align's rollout engine.

For each prompt, `--num-generations` completions are sampled (align.stages.rollout: hf or vllm backend) and
scored by the rewards (align.rewards; several, weighted: r = Σ w_k·r_k, None = not applicable). Advantages are
group-relative: A_i = (r_i − mean(r_group)) / std(r_group) (`--scale-rewards group`, the default; `batch`
scales by the batch std, `none` only centres). The policy loss is PPO's clipped objective on the per-token
ratio π/π_old (`--epsilon`, `--epsilon-high`), aggregated as `--loss` says (TRL 1.16: grpo, dr_grpo, dapo
(default), bnpo, cispo, sapo, luspo, vespo), plus `--beta`·KL(π‖π_ref) with the k3 estimator.

Reference: the starting policy, frozen — the parent run's policy with `--from` (TRL keeps a frozen "ref" copy of
the adapter). `--beta` defaults to 0.04 (DeepSeekMath's GRPO), so the KL to the parent is on unless set to 0
(TRL's own default is 0). At the first step the policy equals the reference: KL = 0.

Options beyond TRL's GRPO (align.stages.grpo_trainer):
- `--advantage grpo|rloo|reinforce_pp`: the critic-free advantage estimator (group mean baseline; leave-one-out
  baseline; REINFORCE++ = group baseline normalised over the batch). `--scale-rewards` defaults to each one's own
  (group, none, batch).
- `--importance-sampling-level sequence` = GSPO: one ratio per sequence, exp(mean_t log π/π_old); `--loss` then
  defaults to grpo (the paper's per-sequence objective) instead of dapo.
- `--is-correction`: importance-sampling correction of the sampler/trainer mismatch (TIS: *_truncate, MIS: *_mask,
  per token or per sequence, weights cut at `--is-cap`); auto = TRL's sequence_mask when the sampler is vLLM on a
  GPU (bf16), none otherwise (the hf backend samples from the trained model; vLLM in fp32 on CPU agrees to ~1e-6).
- `--async --max-staleness K`: sample the next K batches in the background from a snapshot of the policy while the
  current one trains, correcting with the sampler's log-probs (align.stages.async_rollout).
- `--sync-check N`: every N steps, check that the sampler serves the current adapter and agrees with the trainer
  on the sampled tokens' log-probs (mean |Δ log p| ≤ `--sync-threshold`), else stop with a clear error.
- `--num-processes N` with `--backend vllm` (an engine per process) or `--vllm-server` (one server, process 0 loads
  each step's adapter): each process samples its share of the prompts, seeded per completion
  (align.stages.vllm_backend; docs/DISTRIBUTED.md).

Tools (`--tool SPEC`, `--environment SPEC`, align.rewards.tools): rollouts become multi-turn (align.stages.tool_rollout):
the model's `<tool_call>` JSON is run, guarded (`--tool-timeout`), its result appended as a `tool` message, and the
model answers or calls again, up to `--max-tool-calls` turns. The loss covers the model's tokens only (tool results
are masked through TRL's `env_mask`); rewards see the whole conversation (the built-in accuracy and closeness read
the model's last turn, never a tool's result). Logged: `tools/calls`, `tools/errors`, `tools/timeouts` (per
generation batch).

`--batch-size` counts completions per device per step: prompts per step = batch size / num generations.
Logged: reward (total, and per function `rewards/<name>/mean`), reward std, KL, completion length, clip ratios,
entropy; with `--gold-reward` the gold metrics `gold/<name>/mean` (held out: `eval_gold/<name>/mean`), never trained
on (align.stages.gold). `--keep-best METRIC` keeps the best held-out step's policy (align.stages.best). Raises AlignError (exit 2) for config, data, parent and reward-spec problems, all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import Problems
from align.stages.async_rollout import AsyncOptions, make_async
from align.stages.common import as_dataset, finish_stage, launch_or_join, start_stage, trainer_arguments
from align.stages.gold import Gold, GoldOptions
from align.stages.online import RewardOptions, RolloutOptions, ToolOptions, load_prompt_data, make_rollout_engine
from align.stages.options import DataOptions, ModelOptions, TrainOptions


@dataclass
class GRPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, RewardOptions, GoldOptions, AsyncOptions,
                 RolloutOptions, ToolOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    batch_size: int = opt(16, "Completions per device per step (prompts per step = this / --num-generations).", range="[1, inf)")
    beta: float = opt(0.04, "KL coefficient to the reference (the starting/parent policy); 0 disables the reference.", range="[0, inf)")
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] | None = opt(
        None, "Loss aggregation (TRL 1.16 variants); default dapo, or grpo with --importance-sampling-level sequence.")
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = opt(
        "grpo", "Advantage estimator: grpo (r − group mean), rloo (r − mean of the other completions of the group), "
                "reinforce_pp (REINFORCE++: r − group mean, normalised over the batch).")
    scale_rewards: Literal["group", "batch", "none"] | None = opt(
        None, "Divide the centred rewards by the group std, the batch std, or nothing; default: group for grpo, none "
              "for rloo, batch for reinforce_pp.")
    importance_sampling_level: Literal["token", "sequence"] = opt(
        "token", "Policy ratio π/π_old per token, or per sequence (GSPO: exp of the mean token log-ratio).")
    epsilon: float = opt(0.2, "Lower clipping range of the ratio π/π_old.", range="[0, inf)")
    epsilon_high: float | None = opt(None, "Upper clipping range (default: --epsilon).", range="[0, inf)")
    num_iterations: int = opt(1, "Optimisation passes over each batch of rollouts.", range="[1, inf)")
    mask_truncated_completions: bool = opt(False, "Exclude completions cut at --max-completion-length from the loss.")

    def check(self, problems: Problems) -> None:
        if self.num_generations < 2:
            problems.add(f"--num-generations must be at least 2 (advantages compare completions of a group), got "
                         f"{self.num_generations}.")
        if self.batch_size % self.num_generations:
            problems.add(f"--batch-size {self.batch_size} must be a multiple of --num-generations "
                         f"{self.num_generations} (whole groups per step).")
        if self.beta < 0:
            problems.add(f"--beta must be >= 0, got {self.beta}.")
        if self.advantage == "reinforce_pp" and self.scale_rewards not in (None, "batch"):
            problems.add(f"--advantage reinforce_pp normalises over the batch by definition; --scale-rewards "
                         f"{self.scale_rewards} contradicts it (leave it unset, or use --advantage grpo/rloo).")

    def resolved(self) -> dict:
        """The TRL/trainer settings the defaults stand for."""
        scale = self.scale_rewards or {"grpo": "group", "rloo": "none", "reinforce_pp": "batch"}[self.advantage]
        loss = self.loss or ("grpo" if self.importance_sampling_level == "sequence" else "dapo")
        return {"is_correction": self.correction(), "scale_rewards": scale, "loss": loss}


def build_trainer(cfg: GRPOConfig, started, callbacks):
    """The TRL GRPOTrainer for this config, with align's rollout engine and guarded rewards."""
    import os

    from trl import GRPOConfig as TRLGRPOConfig

    from align.stages.grpo_trainer import AlignGRPOTrainer
    from align.stages.rollout import close_on_train_end, trl_rollout_func

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from align.models import disable_dropout

    policy = started.policy
    disable_dropout(policy.model)  # also LoHa/LoKr module dropout, which TRL's disable_dropout leaves on
    rewards = cfg.guarded_rewards()
    resolved = cfg.resolved()
    args = TRLGRPOConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, loss_type=resolved["loss"],
        scale_rewards=resolved["scale_rewards"] if cfg.advantage == "grpo" else "none",
        importance_sampling_level=cfg.importance_sampling_level, vllm_importance_sampling_clip_max=cfg.is_cap,
        vllm_importance_sampling_clip_min=cfg.is_min, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon,
        num_iterations=cfg.num_iterations, mask_truncated_completions=cfg.mask_truncated_completions,
        reward_weights=[g.reward.weight for g in rewards], disable_dropout=True,
    )
    engine = make_rollout_engine(cfg, policy, started.run.path)
    background = make_async(cfg, engine)  # --async: align.stages.async_rollout
    return AlignGRPOTrainer(
        engine=engine, gold=Gold.from_config(cfg), advantage=cfg.advantage, scale_rewards=resolved["scale_rewards"],
        is_correction=resolved["is_correction"], rollout=cfg, async_rollouts=background,
        model=policy.model, reward_funcs=rewards, args=args, processing_class=policy.tokenizer,
        train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation),
        callbacks=[*callbacks, close_on_train_end(engine)],
        rollout_func=background.rollout if background else trl_rollout_func(
            engine, seed=cfg.seed if cfg.num_processes is not None else None,
            tools=cfg.toolset() if cfg.enabled() else None, max_tool_calls=cfg.max_tool_calls),
    )


def main(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run directory."""
    if (workers_run := launch_or_join(cfg, "grpo", load_prompt_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "grpo", load_prompt_data)
    return finish_stage(started, cfg, stage="grpo", task="causal-lm", rewards=cfg.reward_manifest(),
                        resolved=cfg.resolved(), tools=cfg.tools_manifest(), reference="parent policy (frozen)" if cfg.beta > 0 else None,
                        make_trainer=lambda callbacks: build_trainer(cfg, started, callbacks))

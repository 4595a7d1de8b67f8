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

`--batch-size` counts completions per device per step: prompts per step = batch size / num generations.
Logged: reward (total, and per function `rewards/<name>/mean`), reward std, KL, completion length, clip ratios,
entropy. Raises AlignError (exit 2) for config, data, parent and reward-spec problems, all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import Problems
from align.stages.common import as_dataset, finish_stage, load_train_eval, start_stage, trainer_arguments
from align.stages.options import DataOptions, ModelOptions, TrainOptions


@dataclass
class RewardOptions:
    reward: list[str] = opt(factory=list, help="Reward specs (repeatable): built-in name, file.py:fn, package.module:fn, "
                                               "entry-point name or rm run; optional (key=value) settings and @weight.")
    reward_model: str | None = opt(None, "A reward-model run (align rm) used as a reward source (weight 1).")
    reward_timeout: float = opt(60.0, "Seconds a reward function may take per call before it is a fault.")
    reward_faults: Literal["raise", "skip"] = opt(
        "raise", "On a reward fault (exception, NaN, wrong length, timeout): stop with an error naming the function "
                 "and sample, or skip the sample (scored None, logged).")

    def check(self, problems: Problems) -> None:
        if not self.reward and not self.reward_model:
            problems.add("Give at least one reward: --reward SPEC (e.g. accuracy) or --reward-model RM_RUN.")
        if self.reward or self.reward_model:
            from align.rewards import resolve_rewards

            try:
                resolve_rewards(self.reward_specs())
            except Exception as e:  # AlignError listing every bad spec
                problems.add(str(e))

    def reward_specs(self) -> list[str]:
        return [*self.reward, *([self.reward_model] if self.reward_model else [])]

    def guarded_rewards(self):
        from align.rewards import GuardedReward, resolve_rewards

        return [GuardedReward(r, timeout=self.reward_timeout, on_fault=self.reward_faults)
                for r in resolve_rewards(self.reward_specs())]


@dataclass
class RolloutOptions:
    num_generations: int = opt(4, "Completions sampled per prompt (the group).")
    max_completion_length: int = opt(256, "Maximum tokens per completion.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    backend: Literal["auto", "hf", "vllm"] = opt("auto", "Rollout backend: auto = vllm if installed and on GPU, else hf.")
    vllm_memory: float = opt(0.3, "vllm backend: fraction of GPU memory (of host RAM on CPU) for the engine.")
    vllm_server: str | None = opt(None, "Use this separately started vLLM server (URL) instead of a colocated "
                                        "engine; it must run the policy's base with --enable-lora and "
                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.")

    def check(self, problems: Problems) -> None:
        if self.num_generations < 2:
            problems.add(f"--num-generations must be at least 2 (advantages compare completions of a group), got "
                         f"{self.num_generations}.")
        if self.max_completion_length <= 0:
            problems.add(f"--max-completion-length must be positive, got {self.max_completion_length}.")


@dataclass
class GRPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, RewardOptions, RolloutOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.")
    batch_size: int = opt(16, "Completions per device per step (prompts per step = this / --num-generations).")
    beta: float = opt(0.04, "KL coefficient to the reference (the starting/parent policy); 0 disables the reference.")
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = opt(
        "dapo", "Loss aggregation (TRL 1.16 variants).")
    scale_rewards: Literal["group", "batch", "none"] = opt("group", "Divide centred rewards by the group std, the "
                                                                    "batch std, or nothing.")
    epsilon: float = opt(0.2, "Lower clipping range of the ratio π/π_old.")
    epsilon_high: float | None = opt(None, "Upper clipping range (default: --epsilon).")
    num_iterations: int = opt(1, "Optimisation passes over each batch of rollouts.")
    mask_truncated_completions: bool = opt(False, "Exclude completions cut at --max-completion-length from the loss.")

    def check(self, problems: Problems) -> None:
        if self.batch_size % self.num_generations:
            problems.add(f"--batch-size {self.batch_size} must be a multiple of --num-generations "
                         f"{self.num_generations} (whole groups per step).")
        if self.beta < 0:
            problems.add(f"--beta must be >= 0, got {self.beta}.")


def load_prompt_data(cfg):
    from align.data.prompts import load_prompts

    def load(spec: str):
        return load_prompts(spec, split=cfg.split, columns=cfg.columns, system_prompt=cfg.system_prompt)

    return load_train_eval(cfg, load)


def build_trainer(cfg: GRPOConfig, started, callbacks):
    """The TRL GRPOTrainer for this config, with align's rollout engine and guarded rewards."""
    import os

    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from align.stages.rollout import Sampling, close_on_train_end, make_engine, trl_rollout_func

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    policy = started.policy
    rewards = cfg.guarded_rewards()
    args = TRLGRPOConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, loss_type=cfg.loss,
        scale_rewards=cfg.scale_rewards, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon,
        num_iterations=cfg.num_iterations, mask_truncated_completions=cfg.mask_truncated_completions,
        reward_weights=[g.reward.weight for g in rewards], disable_dropout=True,
    )
    engine = make_engine(cfg.backend, policy.tokenizer,
                         Sampling(cfg.max_completion_length, cfg.temperature, cfg.top_p), server=cfg.vllm_server,
                         base_model=policy.manifest["base_model"], memory=cfg.vllm_memory, run_dir=started.run.path,
                         adapter=policy.adapter, merged_adapters=policy.manifest.get("merged_adapters", []),
                         lora_rank=getattr(getattr(policy.model, "peft_config", {}).get("default"), "r", 16),
                         seed=cfg.seed)
    return GRPOTrainer(
        model=policy.model, reward_funcs=rewards, args=args, processing_class=policy.tokenizer,
        train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation),
        callbacks=[*callbacks, close_on_train_end(engine)], rollout_func=trl_rollout_func(engine),
    )


def main(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run directory."""
    started = start_stage(cfg, "grpo", load_prompt_data)
    return finish_stage(started, cfg, stage="grpo", task="causal-lm", rewards=cfg.reward_specs(),
                        reference="parent policy (frozen)" if cfg.beta > 0 else None,
                        make_trainer=lambda callbacks: build_trainer(cfg, started, callbacks))

"""`align ppo`: actor-critic PPO for RLHF (the classic third stage: sft → rm → ppo), align's own loop — TRL 1.16
has no PPO.

One step:
1. Rollout: `--batch-size` completions (`--batch-size / --num-generations` prompts, each sampled
   `--num-generations` times) from the actor through the shared rollout engine (align.stages.rollout: hf, or vllm
   with adapter-only sync).
2. Scoring: the sequence score s = Σ_k w_k·r_k over the reward sources (`--reward-model RM_RUN`, `--reward SPEC`);
   optionally clipped to ±`--reward-clip`; `--missing-eos-penalty` is subtracted from completions cut at
   `--max-completion-length`.
3. Per-token rewards (align.stages.advantages.rlhf_token_rewards): r_t = −β·(log π_old(a_t|s_t) − log π_ref(a_t|s_t)),
   plus s on the last completion token; β = `--kl-coef`, adapted towards `--target-kl` when given (Ziegler et al.).
   Optionally whitened (`--whiten-rewards`, mean kept).
4. GAE (`--gamma`, `--lam`) on the critic's values V_old(s_t) gives advantages A_t and returns R_t = A_t + V_old(s_t);
   advantages are whitened over the batch.
5. `--ppo-epochs` passes over the batch, shuffled into `--num-minibatches` minibatches (one optimizer step each,
   accumulated over `--grad-accum` micro-batches), minimising (align.stages.ppo_losses)
       L = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))] + c_v·½·E[max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)]
   with ρ = π/π_old, ε = `--cliprange`, ε_v = `--cliprange-value`, c_v = `--vf-coef`.

Implementation choices (numbers from "The N Implementation Details of RLHF with PPO", Huang et al. 2023, and the
TRL PPOTrainer that 1.16 removed): per-token KL penalty in the reward with the k1 estimator, the score at the last
token; value model initialised from the reward model (align.stages.critic); whitened advantages; optional reward
whitening; clipped value loss; adaptive KL option; logits divided by the sampling temperature when computing
log-probs; dropout off (so π = π_ref exactly at step 1: KL 0); no penalty for truncation unless asked. π_old and
V_old are recomputed by the trainer after sampling, so a vLLM sampler's numerical mismatch never enters ρ; the
samples themselves are then slightly off-policy, which `--is-correction` reweights (w = π_old/π_sampler per token
or sequence, truncated or masked at `--is-cap`; auto = on for vLLM on a GPU) and `--sync-check N` bounds. Actor
and critic losses are backpropagated one after the other per micro-batch (the same gradients as their sum, one
graph in memory at a time). Entropy is logged, not optimised.

Reference = the parent policy, frozen. With `--handoff merge` (ppo's default) the parent adapter is merged into
the base and the actor is a fresh adapter on top, so the reference is the same model with adapters disabled; with
`--handoff continue` a frozen copy of the parent's adapter ("ref") is kept next to the trained one. Merge is the
default because the reward model of `sft → rm` is trained on exactly that merged base, so the critic can share the
actor's base weights (see align.stages.critic for the memory choice).

Several processes (`--num-processes N`, align.launch; DDP only): each process samples `--batch-size` completions for
its share of the step's prompts; whitening, the per-token loss normalisation and the metrics use every process's
batch, and the gradients are averaged before each optimizer step (`Processes` below) — N processes with batch B/N
follow the 1-process run with batch B.

Gold metrics (`--gold-reward`, align.stages.gold) are scored on each step's rollouts and on the held-out prompts
(`gold/<name>/mean`, `eval/gold/<name>/mean`, with `eval/kl` the sequence KL of the held-out completions) and never
enter the score. `--keep-best METRIC` (align.stages.best) saves the actor at each new best held-out value (step 0, the
starting policy, included) to RUN/best/ and installs it as adapter/ at the end; critic/ stays the last step's.

Run directory: adapter/ (the actor; a policy for the next stage), critic/ (critic.safetensors: the critic's adapter
and value head; critic.json), metrics.jsonl, logs/, checkpoints/checkpoint-N (actor, critic, optimizer, scheduler,
KL coefficient, RNG states: `--resume` continues exactly where it stopped).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from align.adapters import AdapterOptions, stage_limit
from align.config import Config, opt
from align.errors import AlignError, Problems
from align.launch import sharded_launch
from align.stages.data_parallel import Processes, mean_or_nan
from align.stages.gold import GoldOptions
from align.stages.online import RewardOptions, RolloutOptions, load_prompt_data, make_rollout_engine
from align.stages.options import DataOptions, ModelOptions, TrainOptions
from align.stages.ppo_batch import Batch, completion_logprobs, padded_rows
from align.stages.rng import rng_state, set_rng_state

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, RewardOptions, GoldOptions, RolloutOptions,
                Config):
    handoff: Literal["continue", "merge"] = opt(
        "merge", "With --from: merge the parent's adapter into the base and train a fresh adapter on top (default: "
                 "the reference is the same model with adapters off, and a critic from an rm of the same parent "
                 "shares the base), or continue training the parent's adapter.")
    lr: float = opt(1e-5, "Peak learning rate (actor and critic).", range="(0, inf)")
    lr_scheduler: str = opt("linear", "Learning-rate schedule over all optimizer steps (linear, cosine, constant, ...).")
    batch_size: int = opt(16, "Completions per rollout step (prompts per step = this / --num-generations).", range="[1, inf)")
    num_generations: int = opt(1, "Completions sampled per prompt.", range="[1, inf)")
    max_completion_length: int = opt(64, "Maximum tokens per completion.", range="[1, inf)")
    logging_steps: int = opt(1, "Log metrics every N rollout steps.", range="[1, inf)")
    ppo_epochs: int = opt(4, "Optimisation passes over each rollout batch.", range="[1, inf)")
    num_minibatches: int = opt(1, "Minibatches (optimizer steps) per PPO epoch; each is split into --grad-accum "
                                  "micro-batches.", range="[1, inf)")
    kl_coef: float = opt(0.05, "β: per-token KL penalty to the reference in the reward (initial value with --target-kl).", range="[0, inf)")
    target_kl: float | None = opt(None, "Adaptive KL: adjust β so the per-sequence KL tracks this target.", range="(0, inf)")
    kl_horizon: int = opt(10000, "Adaptive KL horizon, in samples.", range="[1, inf)")
    gamma: float = opt(1.0, "Discount factor of GAE.", range="[0, 1]")
    lam: float = opt(0.95, "λ of GAE.", range="[0, 1]")
    cliprange: float = opt(0.2, "Clip range ε of the policy ratio π/π_old.", range="(0, inf)")
    cliprange_value: float = opt(0.2, "Clip range of the value prediction around the rollout's values.", range="(0, inf)")
    vf_coef: float = opt(0.1, "Weight of the value loss.", range="[0, inf)")
    whiten_rewards: bool = opt(False, "Whiten the per-token rewards over the batch (mean kept) before GAE.")
    reward_clip: float | None = opt(None, "Clip sequence scores to [-C, C].", range="(0, inf)")
    missing_eos_penalty: float | None = opt(None, "Subtract this from the score of completions cut at "
                                                  "--max-completion-length (no end-of-sequence token).")
    critic_init: Literal["auto", "reward_model", "policy"] = opt(
        "auto", "Initialise the critic from the reward model run (adapter + score head) or from the policy (fresh "
                "adapter, zero head); auto = reward_model when --reward-model is given and shares the actor's tokenizer.")
    critic_placement: Literal["auto", "shared", "separate"] = opt(
        "auto", "Critic as a second adapter on the actor's base (shared, one copy of the base weights) or as its own "
                "model (separate); auto = shared when possible.")

    def check(self, problems: Problems) -> None:
        if self.batch_size % self.num_generations:
            problems.add(f"--batch-size {self.batch_size} must be a multiple of --num-generations {self.num_generations}.")
        if self.batch_size % (self.num_minibatches * self.grad_accum):
            problems.add(f"--batch-size {self.batch_size} must split into --num-minibatches {self.num_minibatches} × "
                         f"--grad-accum {self.grad_accum} equal micro-batches.")
        for name in ("ppo_epochs", "num_minibatches", "kl_horizon"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        for name in ("kl_coef", "vf_coef"):
            if getattr(self, name) < 0:
                problems.add(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}.")
        for name in ("target_kl", "reward_clip", "cliprange", "cliprange_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {value}.")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                problems.add(f"--{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.critic_init == "reward_model" and not self.reward_model:
            problems.add("--critic-init reward_model needs --reward-model RM_RUN (or use --critic-init policy).")
        if sharded_launch(self.accelerate_config):
            problems.add(f"ppo's own loop is data parallel (DDP) only; {sharded_launch(self.accelerate_config)} is for "
                         "the TRL stages (sft, rm, dpo, grpo). Use --accelerate-config ddp or just --num-processes N.")
        if self.vllm_server and self.from_run and self.handoff == "merge":
            problems.add("--vllm-server holds the plain base, so it cannot serve a merged parent: add --handoff "
                         "continue (ppo's default is merge) or use the colocated --backend vllm.")


class PPO:
    """State and steps of one PPO run (actor, reference, critic, rewards, engine, optimizer)."""

    def __init__(self, cfg: PPOConfig, started):
        from transformers import get_scheduler

        from align.models import disable_dropout
        from align.stages.best import Keeper
        from align.stages.common import stage_trackers
        from align.stages.critic import CRITIC, build_critic
        from align.stages.gold import Gold
        from align.stages.ppo_losses import AdaptiveKL

        self.cfg, self.run, self.policy = cfg, started.run, started.policy
        self.train_rows, self.eval_rows = started.train, started.evaluation
        if limit := stage_limit(self.policy.adapter, "ppo"):  # refused at validation (align.handoff.check_adapter)
            raise AlignError(f"--adapter {self.policy.adapter}: {limit}.")
        self.processes = Processes()
        self.model = self.processes.place(self.policy.model)
        self.tokenizer = self.policy.tokenizer
        actor_params = [p for p in self.model.parameters() if p.requires_grad]
        self.reference = self._add_reference()
        self.critic = build_critic(self.policy, init=cfg.critic_init, placement=cfg.critic_placement,
                                   reward_model=cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
        self.processes.place(self.critic.model)  # a separate critic model too (a shared one is the actor's)
        self.trainable = ("default", CRITIC) if self.critic.placement == "shared" else ("default",)
        self.rewards = cfg.guarded_rewards()
        self.gold = Gold.from_config(cfg)  # metrics only: never in the score (align.stages.gold)
        self.best = Keeper(self.run, cfg.keep_best, resume_step=checkpoint_step(started.resume_from)) \
            if cfg.keep_best else None
        self.reward_logs: dict[str, list[float]] = {}  # log_metric(name, value) calls of the reward functions
        self.reward_models = self._place_reward_models()
        for model in {id(self.model): self.model, id(self.critic.model): self.critic.model}.values():
            disable_dropout(model)  # after every adapter is added: π = π_ref at step 1, deterministic scores
        self.engine = make_rollout_engine(cfg, self.policy, self.run.path)
        self.correction = cfg.correction()
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        self.prompts_per_step = cfg.batch_size // cfg.num_generations  # per process
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(
            1, math.ceil(cfg.epochs * len(self.train_rows) / (self.prompts_per_step * self.processes.count)))
        critic_params = self.critic.parameters()
        self.params = actor_params + critic_params
        self.optimizer = torch.optim.AdamW([{"params": actor_params}, {"params": critic_params}],
                                           lr=cfg.lr, weight_decay=cfg.weight_decay)
        updates = self.total_steps * cfg.ppo_epochs * cfg.num_minibatches
        warmup = int(cfg.warmup * updates) if cfg.warmup < 1 else int(cfg.warmup)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=updates)
        self.step = 0
        self.orders: dict[int, torch.Tensor] = {}  # data order of the current pass
        self.trackers = stage_trackers(self.run, cfg)

    def _add_reference(self) -> str | None:
        """The frozen reference: None = the model with adapters disabled; "ref" = a frozen copy of the parent's
        adapter (--handoff continue)."""
        if self.policy.manifest.get("handoff") != "continue":
            return None
        parent = Path(self.policy.manifest["parent"]) / "adapter"
        self.model.load_adapter(str(parent), adapter_name="ref", is_trainable=False)
        return "ref"

    def _place_reward_models(self) -> dict[str, str]:
        """Reward-model sources trained on the actor's base run as frozen adapters on the actor's model (no copy of
        the base); others load their own model. Returns spec -> "shared" | "separate" for the manifest."""
        from align.rewards.reward_model import RewardModelScorer
        from align.stages.critic import place_reward_model

        out = {}
        for i, guarded in enumerate(self.rewards):
            if isinstance(guarded.reward.fn, RewardModelScorer):
                shared = place_reward_model(self.policy, guarded.reward.fn, f"reward{i}")
                out[guarded.reward.spec] = "shared" if shared else "separate"
        return out

    # -- pieces of a step ------------------------------------------------------------------------------------
    def actor(self) -> Any:
        from align.models import activate

        activate(self.model, "default", self.trainable)
        return self.model

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        from align.models import activate

        if self.reference is None:
            with self.model.disable_adapter():
                return completion_logprobs(self.model, batch, self.cfg.temperature)
        activate(self.model, self.reference, self.trainable)
        return completion_logprobs(self.model, batch, self.cfg.temperature)

    def prompt_rows(self, step: int) -> list[dict[str, Any]]:
        """This process's prompts of rollout step `step` (0-based): a fresh seeded permutation per pass over the data;
        a step takes `prompts_per_step` × processes prompts of it, process k the k-th share."""
        n, out, per = len(self.train_rows), [], self.prompts_per_step
        first = (step * self.processes.count + self.processes.index) * per
        for g in range(first, first + per):
            epoch, i = divmod(g, n)
            if epoch not in self.orders:
                self.orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))}
            out.append(self.train_rows[int(self.orders[epoch][i])])
        return [row for row in out for _ in range(self.cfg.num_generations)]

    def sample(self, rows: list[dict[str, Any]], seeded: bool = False
               ) -> tuple[list[list[int]], list[list[int]], list[list[float]] | None]:
        """(prompt ids, completion ids, the sampler's log-probs of the completion tokens or None). `seeded` (training
        rollouts with --num-processes): every completion sampled with its own seed (rollout.row_seeds)."""
        from align.stages.rollout import generate_together, render_prompts, row_seeds

        model = self.actor()
        self.engine.sync(model, self.step)
        prompt_ids = render_prompts(self.tokenizer, [r["prompt"] for r in rows])
        if not seeded:  # held-out sampling: each process its own shard, batch counts may differ
            return (prompt_ids, *self.engine.generate(model, prompt_ids))
        seeds = row_seeds(self.cfg.seed, self.step, self.processes.index * len(rows), len(rows)) \
            if self.cfg.num_processes is not None else None
        completion_ids, logprobs = generate_together(self.engine, model, prompt_ids, seeds)
        return prompt_ids, completion_ids, logprobs

    def reward_call(self, rows, completion_ids):
        """The call every reward (and gold) function of this step receives (align.rewards.call)."""
        from transformers import TrainerState

        from align.rewards.call import build_call

        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        state = TrainerState(global_step=self.step, max_steps=self.total_steps)
        return build_call(rows, texts, completion_ids, trainer_state=state,
                          log_metric=lambda name, value: self.reward_logs.setdefault(name, []).append(value))

    def gold_scores(self, rows, completion_ids) -> dict[str, list[float | None]]:
        """{gold/<name>/mean: scores} of the completions: logged beside the proxy, never part of `score`."""
        return self.gold.scores(self.reward_call(rows, completion_ids)) if self.gold is not None else {}

    def score(self, rows, completion_ids) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(scores, per-function means, truncated mask) of the completions, with clipping and EOS penalty."""
        from align.rewards.guard import weighted_total

        per_fn = self.reward_call(rows, completion_ids).score(self.rewards)
        scores = torch.tensor(weighted_total(per_fn, [fn.reward.weight for fn in self.rewards]))
        means = {f"rewards/{fn.__name__}/mean": mean_or_nan([v for v in vals if v is not None])
                 for fn, vals in zip(self.rewards, per_fn, strict=True)}
        if self.cfg.reward_clip is not None:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        eos = self.tokenizer.eos_token_id
        truncated = torch.tensor([not ids or ids[-1] != eos for ids in completion_ids])
        if self.cfg.missing_eos_penalty is not None:
            scores = scores - self.cfg.missing_eos_penalty * truncated.float()
        return scores, means, truncated

    @torch.no_grad()
    def evaluate_rollout(self, batch: Batch) -> dict[str, torch.Tensor]:
        """π_old, π_ref and V_old on the sampled batch, in micro-batches."""
        cfg, out = self.cfg, {"logprobs": [], "ref_logprobs": [], "values": []}
        for index in torch.chunk(torch.arange(len(batch.mask)), cfg.num_minibatches * cfg.grad_accum):
            part = batch.rows(index)
            out["logprobs"].append(completion_logprobs(self.actor(), part, cfg.temperature))
            out["ref_logprobs"].append(self.reference_logprobs(part))
            out["values"].append(self.critic.values(part.input_ids, part.attention_mask, part.position_ids, part.start))
        return {k: torch.cat(v) * batch.mask for k, v in out.items()}

    def train_step(self) -> dict[str, float]:
        """One rollout step: sample, score, estimate advantages, optimise. Returns its metrics."""
        from align.stages.advantages import gae, importance_weights, masked_mean, rlhf_token_rewards, whiten
        from align.stages.ppo_losses import explained_variance
        from align.stages.rollout import check_sync

        cfg, t0 = self.cfg, time.perf_counter()
        rows = self.prompt_rows(self.step)
        prompt_ids, completion_ids, sampler_logprobs = self.sample(rows, seeded=True)
        t1 = time.perf_counter()
        scores, reward_means, truncated = self.score(rows, completion_ids)
        gold = {k: mean_or_nan([v for v in vals if v is not None])
                for k, vals in self.gold_scores(rows, completion_ids).items()}
        t2 = time.perf_counter()
        device = next(self.model.parameters()).device
        batch = Batch.build(prompt_ids, completion_ids, self.tokenizer.pad_token_id, device)
        old = self.evaluate_rollout(batch)
        sampler = padded_rows(sampler_logprobs, old["logprobs"])
        sync = check_sync(self.engine, self.step, old["logprobs"], sampler, batch.mask, cfg.sync_threshold,
                          model=self.model) \
            if cfg.sync_check_due(self.step) else None
        correction = {}
        if self.correction != "none" and sampler is not None:
            old["is_weights"], cut = importance_weights(old["logprobs"], sampler, batch.mask, self.correction,
                                                        cfg.is_cap, cfg.is_min)
            correction = {"sampling/is_ratio_mean": masked_mean(old["is_weights"].expand_as(batch.mask),
                                                                batch.mask).item(), "sampling/is_cut_frac": cut.item()}
        rewards, kl = rlhf_token_rewards(scores.to(device), old["logprobs"], old["ref_logprobs"], batch.mask,
                                         self.kl.value)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, batch.mask, shift_mean=False, total=self.processes.total)
        advantages, returns = gae(rewards, old["values"], batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask, total=self.processes.total)
        stats = self.optimise(batch, old, advantages, returns)
        t3 = time.perf_counter()
        kl_per_sequence = kl.sum(1)
        non_score = (-self.kl.value * kl).sum(1)
        metrics = {
            "objective/scores": scores.mean().item(),
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (scores.to(device) + non_score).mean().item(),
            **reward_means,
            **gold,
            **stats,
            "val/explained_variance": explained_variance(old["values"], returns, batch.mask).item(),
            "val/mean": masked_mean(old["values"], batch.mask).item(),
            "completions/mean_length": batch.mask.sum(1).mean().item(),
            "completions/truncated_fraction": truncated.float().mean().item(),
            "kl_coef": self.kl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "timing/rollout_s": t1 - t0, "timing/scoring_s": t2 - t1, "timing/training_s": t3 - t2,
            **{name: sum(values) / len(values) for name, values in self.reward_logs.items()},
            **({"sampling/sync_logp_diff": sync} if sync is not None else {}), **correction,
        }
        self.reward_logs.clear()
        metrics = self.processes.mean(metrics)  # several processes: each metric averaged over them
        self.kl.update(metrics["objective/kl"], len(scores) * self.processes.count)
        return metrics

    def optimise(self, batch: Batch, old, advantages, returns) -> dict[str, float]:
        from align.stages.ppo_losses import policy_loss, value_loss

        cfg, sums, count = self.cfg, {}, 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(batch.mask))
            for minibatch in torch.chunk(order, cfg.num_minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                for index in torch.chunk(minibatch, cfg.grad_accum):
                    part, mask = batch.rows(index), batch.mask[index]
                    share = self.processes.token_share(mask)  # several processes: per-token means over all of them
                    logprobs, ent = completion_logprobs(self.actor(), part, cfg.temperature, with_entropy=True)
                    weights = old["is_weights"][index] if "is_weights" in old else None
                    pg, pg_stats = policy_loss(logprobs, old["logprobs"][index], advantages[index], mask, cfg.cliprange,
                                               weights)
                    pg = pg * share
                    (pg / cfg.grad_accum).backward()
                    values = self.critic.values(part.input_ids, part.attention_mask, part.position_ids, part.start)
                    vf, vf_stats = value_loss(values, old["values"][index], returns[index], mask, cfg.cliprange_value)
                    vf = vf * share
                    (cfg.vf_coef * vf / cfg.grad_accum).backward()
                    for key, value in {"loss/policy_avg": pg, "loss/value_avg": vf, "policy/entropy_avg": ent * share,
                                       "policy/approxkl_avg": pg_stats["approx_kl"] * share,
                                       "policy/clipfrac_avg": pg_stats["clipfrac"] * share,
                                       "val/clipfrac_avg": vf_stats["value_clipfrac"] * share}.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
                    count += 1
                self.processes.average_gradients(self.params)  # what DDP does: every process steps with the mean
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
        return {k: v / count for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of sampled completions for the held-out prompts (a fixed sampling seed, RNG left untouched), the
        gold metrics of the same completions, and their KL to the reference (Σ_t log π − log π_ref over the sampled
        tokens, as `objective/kl`)."""
        if not self.eval_rows:
            return {}
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        self.engine.sync(self.actor(), self.step)  # on every process, whatever its shard (a collective with a server)
        scores, lengths, kls, per_fn, gold = [], [], [], {}, {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            shard = self.eval_rows[self.processes.index :: self.processes.count]  # several processes: a share each
            for i in range(0, len(shard), size):
                rows = shard[i : i + size]
                prompt_ids, completion_ids, _ = self.sample(rows)
                batch_scores, means, _ = self.score(rows, completion_ids)
                scores.extend(batch_scores.tolist())
                lengths.extend(len(c) for c in completion_ids)
                kls.extend(self.sequence_kl(prompt_ids, completion_ids).tolist())
                for k, v in means.items():
                    per_fn.setdefault(k, []).append(v)
                for k, vals in self.gold_scores(rows, completion_ids).items():
                    gold.setdefault(k, []).extend(v for v in vals if v is not None)
        self.reward_logs.clear()  # the reward functions' log_metric values belong to training steps
        return self.processes.mean({"eval/score": mean_or_nan(scores), "eval/completion_length": mean_or_nan(lengths),
                                    "eval/kl": mean_or_nan(kls), **{f"eval/{k}": mean_or_nan(v) for k, v in per_fn.items()},
                                    **{f"eval/{k}": mean_or_nan(v) for k, v in gold.items()}})

    def sequence_kl(self, prompt_ids, completion_ids) -> torch.Tensor:
        """Σ_t (log π − log π_ref) over each completion's sampled tokens (the k1 estimate of the sequence KL)."""
        batch = Batch.build(prompt_ids, completion_ids, self.tokenizer.pad_token_id, next(self.model.parameters()).device)
        logprobs = completion_logprobs(self.actor(), batch, self.cfg.temperature)
        return ((logprobs - self.reference_logprobs(batch)) * batch.mask).sum(1).cpu()

    def offer_best(self, metrics: dict[str, float]) -> None:
        """--keep-best: a new best held-out value saves this step's actor to RUN/best (align.stages.best)."""
        from align.models import save_policy

        if self.best is not None:
            self.best.offer(metrics, self.step, lambda d: save_policy(self.model, self.tokenizer, d))
            self.processes.wait()

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Written by the main process (with every process's RNG state); the others wait for it."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from align.integrity import seal

        rngs = self.processes.gather([rng_state()])
        if not self.run.writer:
            self.processes.wait()
            return
        root = self.run.checkpoints_dir
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".checkpoint-{self.step}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        actor = get_peft_model_state_dict(self.model, adapter_name="default")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in actor.items()}, str(tmp / "actor.safetensors"))
        self.critic.save(tmp / "critic")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": rngs[0], **({"rng_per_process": rngs} if len(rngs) > 1 else {})}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"global_step": self.step, "kl_coef": self.kl.value}) + "\n")
        seal(tmp)  # last: the checkpoint counts from here (align.integrity); older ones are deleted only after it
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        limit = self.cfg.save_total_limit
        kept = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in kept[: max(0, len(kept) - limit)] if limit else []:
            shutil.rmtree(old, ignore_errors=True)
        self.processes.wait()

    def load_checkpoint(self, checkpoint: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(checkpoint / "actor.safetensors")), adapter_name="default")
        self.critic.load(checkpoint / "critic")
        try:
            state = torch.load(checkpoint / "state.pt", weights_only=True)
        except pickle.UnpicklingError:
            raise AlignError(f"{checkpoint / 'state.pt'} holds more than tensors and plain values (an older align "
                             "pickled numpy's RNG state there), so it is not loaded. Start the run again with "
                             "--overwrite.") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rng_per_process", [])
        set_rng_state(rngs[self.processes.index] if len(rngs) == self.processes.count else state["rng"])
        info = json.loads((checkpoint / "trainer_state.json").read_text())
        self.step, self.kl.value = info["global_step"], info["kl_coef"]

    # -- driving -----------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float]) -> None:
        self.run.log_metrics({"step": self.step, **metrics})
        self.trackers.log(metrics, self.step)

    def train(self, resume_from: Path | None) -> dict[str, float]:
        from tqdm.auto import tqdm

        from align.interrupt import GracefulStop, pause_point

        cfg, start, stop = self.cfg, time.perf_counter(), GracefulStop()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        else:
            self.run.truncate_metrics(after_step=-1)  # starting over (e.g. --resume before any checkpoint)
            if self.eval_rows:
                first = self.evaluate()
                self.offer_best(first)
                self.log(first)
        last: dict[str, float] = {}
        eval_every = cfg.eval_steps or cfg.logging_steps
        try:  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop (align.interrupt)
            with stop, tqdm(total=self.total_steps, initial=self.step, desc="PPO", unit="step",
                            disable=not self.run.writer) as bar:
                while self.step < self.total_steps:
                    pause_point(self.step, stop)
                    metrics = self.train_step()
                    self.step += 1
                    done = self.step == self.total_steps
                    if self.eval_rows and (self.step % eval_every == 0 or done):
                        metrics.update(self.evaluate())
                        self.offer_best(metrics)
                    if self.step % cfg.logging_steps == 0 or self.step == 1 or done:
                        self.log(metrics)
                    stop.saving = stopping = stop.agreed()
                    if self.step % cfg.save_steps == 0 and not done or stopping:
                        self.save_checkpoint()
                    last = metrics
                    bar.update(1)
                    bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                    if stopping:
                        break
        finally:
            self.engine.close()
            self.trackers.close()
        stop.raise_if_stopped(self.step, self.run.last_checkpoint())
        return {**last, "train_runtime": time.perf_counter() - start, "global_step": self.step}


def checkpoint_step(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[-1]) if checkpoint is not None else None


def main(cfg: PPOConfig) -> Path:
    """Run PPO as configured; returns the run directory."""
    from align import health
    from align.export import write_base
    from align.models import save_policy
    from align.stages.common import launch_or_join, stage_manifest, start_stage

    if (workers_run := launch_or_join(cfg, "ppo", load_prompt_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "ppo", load_prompt_data)
    ppo = PPO(cfg, started)
    run = started.run
    start = health.weight_summary(ppo.model, trainable_only=False)  # actor and critic adapters take turns training
    with run.lifecycle(**stage_manifest("ppo", "causal-lm", cfg, ppo.policy, started.datasets),
                       rewards=cfg.reward_manifest(), reference="parent policy (frozen)", critic=ppo.critic.describe(),
                       reward_models=ppo.reward_models, is_correction=ppo.correction):
        metrics = ppo.train(started.resume_from)
        end = health.check_weights(ppo.model, start, cfg.lr, trainable_only=False, run=run)
        best = ppo.best.finish() if ppo.best is not None else None
        if run.writer:  # the main process; the processes' copies are identical
            with run.artifact("adapter") as tmp:
                if best:  # --keep-best: the best evaluation step's actor
                    ppo.best.install(tmp)
                else:
                    save_policy(ppo.model, ppo.tokenizer, tmp)
            with run.artifact("critic") as tmp:  # the last step's critic, also with --keep-best
                ppo.critic.save(tmp)
            write_base(run.path, {**ppo.policy.manifest, "adapter": ppo.policy.adapter,
                                  "quantized_4bit": ppo.policy.quantized_4bit},
                       task="causal-lm", pad_token_id=None, trust_remote_code=cfg.trust_remote_code)
        run.update_manifest(metrics=metrics, **({"best": best} if best else {}))
        health.record(run, cfg, "ppo", started.train, start, end)
        if best:
            ppo.best.discard()
    return run.path

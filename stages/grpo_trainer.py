"""TRL's GRPOTrainer with what `align grpo` adds on top of it, kept to three small hooks around TRL's own code:

- `--advantage rloo|reinforce_pp`: after TRL scores a batch, the advantages are recomputed from the same rewards
  (align.stages.advantages.group_advantages); `grpo` keeps TRL's.
- Rollout correction (`--is-correction`): TRL applies truncated/masked importance sampling between the sampler's and
  the trainer's log-probs only when it drives vLLM itself. align's rollout engine returns the sampler's log-probs
  through `rollout_func`, so the trainer turns TRL's correction on (`use_vllm`, with a no-op weight sync: the engine
  syncs the adapter itself) and logs the fraction of weights cut (`sampling/is_cut_frac`) beside TRL's ratio stats.
- `--gold-reward SPEC`: gold metrics scored on the same completions after the rewards, logged (`gold/<name>/mean`,
  held out `eval_gold/<name>/mean`) and never added to the rewards (align.stages.gold).
- `--sync-check N`: every N steps the trainer scores the tokens the engine just sampled and stops
  (align.stages.rollout.check_sync) when the served adapter is not the current step's or the mean |Δ log p| over
  the sampled tokens passes `--sync-threshold` ("rollouts silently use stale weights"), or, with several processes,
  when their adapters differ; the verdict is agreed over the processes. Logged as `sampling/sync_logp_diff` (the
  largest over the processes).
- Multi-turn rollouts with tools: the rollout engine runs the tool loop (align.stages.tool_rollout) and hands TRL
  the model-token mask as `env_mask`; the correction's cut fraction and the sync check use it too (`model_tokens`),
  so neither compares the sampler with the trainer on tool-result tokens.
- Exact resume inside a generation batch: with `--num-iterations` > 1 (or several optimizer steps per generation)
  TRL reuses one batch of completions over several steps and, resumed between them, would sample that batch anew.
  The checkpoint keeps the buffered completions and TRL's micro-step counter (grpo_buffer-<process>.pt, tensors
  and plain values, loaded with weights_only=True), so the resumed run trains on the same completions.
- `--async`: the batches of the next steps are read ahead and sampled in the background (align.stages.async_rollout);
  three hooks hand it the trainer's batch fetch and its checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from trl import GRPOTrainer


def model_tokens(output: dict[str, Any]) -> torch.Tensor:
    """The completion tokens the model generated: the completion mask, without tool results (TRL's `tool_mask`)."""
    mask = output["completion_mask"]
    return mask * output["tool_mask"] if "tool_mask" in output else mask


class _EngineSyncs:
    """Stands in for TRL's vLLM weight sync: align's rollout engine syncs the adapter in `rollout_func`."""

    def sync_weights(self) -> None:
        pass


class AlignGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, engine, rollout, gold=None, advantage: str = "grpo", scale_rewards: str = "group",
                 is_correction: str = "none", async_rollouts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.async_rollouts = async_rollouts  # align.stages.async_rollout.AsyncRollouts under --async, else None
        if async_rollouts is not None:
            async_rollouts.attach(self)
        self.engine, self.rollout = engine, rollout  # rollout: the RolloutOptions (sync check)
        self.gold = gold  # align.stages.gold.Gold or None: metrics only, never in the rewards
        self.advantage, self.align_scale, self.is_correction = advantage, scale_rewards, is_correction
        if is_correction != "none":  # TRL's rollout correction, fed by the engine's log-probs
            self.use_vllm, self.vllm_mode = True, "align"
            self.vllm_generation, self._last_loaded_step = _EngineSyncs(), -1
            self.vllm_importance_sampling_correction = True
            self.vllm_importance_sampling_mode = is_correction
        self._rewards_per_func: torch.Tensor | None = None

    # -- exact resume inside a generation batch ----------------------------------------------------------------
    def _buffer_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"grpo_buffer-{self.accelerator.process_index}.pt")

    def _save_rng_state(self, output_dir: str) -> None:  # the Trainer writes trainer_state.json after this
        super()._save_rng_state(output_dir)
        if self.async_rollouts is not None:
            self.async_rollouts.save(output_dir, self.accelerator.process_index)
        if self._buffered_inputs is not None:
            torch.save({"step": self._step, "inputs": self._buffered_inputs}, self._buffer_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:  # called once, where the resumed run continues
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and os.path.isfile(self._buffer_file(checkpoint)):
            device = self.accelerator.device  # launched on CPU it is cpu:0, which torch.load cannot map to
            saved = torch.load(self._buffer_file(checkpoint), map_location="cpu" if device.type == "cpu" else device,
                               weights_only=True)
            self._step, self._buffered_inputs = saved["step"], saved["inputs"]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:  # before the first batch
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.async_rollouts is not None:
            self.async_rollouts.load(resume_from_checkpoint, self.accelerator.process_index)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        if self.async_rollouts is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = self.async_rollouts.batch_samples(self, epoch_iterator, num_batches)
        return batches, self._get_num_items_in_batch(batches, device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.gold is not None:
            self._log_gold(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    # -- gold metrics ------------------------------------------------------------------------------------------
    def _log_gold(self, inputs, prompts, completions, completion_ids_list) -> None:
        """Gold metrics (align.stages.gold) of this process's completions, averaged over every process's, logged
        beside the rewards; they are not in `_rewards_per_func`, so they reach neither the advantages nor the loss."""
        from align.rewards.call import RESERVED, RewardCall

        columns = {k: [row[k] for row in inputs] for k in inputs[0] if k not in RESERVED}
        call = RewardCall(prompts, completions, {**columns, "completion_ids": completion_ids_list,
                                                 "trainer_state": self.state})
        mode = "train" if self.model.training else "eval"
        for key, values in self.gold.scores(call).items():
            local = torch.tensor([torch.nan if v is None else v for v in values], device=self.accelerator.device)
            self._metrics[mode][key].append(torch.nanmean(self.accelerator.gather(local)).item())

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if self.advantage != "grpo":
            output["advantages"] = self._advantages(len(output["advantages"]), mode)
        if self.is_correction != "none" and "sampling_per_token_logps" in output:
            self._log_cut_fraction(output, mode)
        if mode == "train" and self.rollout.sync_check_due(self.state.global_step):
            self._check_sync(output)
        return output

    # -- advantages --------------------------------------------------------------------------------------------
    def _advantages(self, local: int, mode: str) -> torch.Tensor:
        from align.stages.advantages import group_advantages

        per_func = self._rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # unscorable: every function returned None
        k = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_advantages(rewards, k, self.advantage, self.align_scale)
        start = self.accelerator.process_index * local
        return advantages[start : start + local]

    # -- rollout correction ------------------------------------------------------------------------------------
    def _log_cut_fraction(self, output: dict[str, Any], mode: str) -> None:
        from align.stages.advantages import importance_weights

        _, cut = importance_weights(output["old_per_token_logps"], output["sampling_per_token_logps"],
                                    model_tokens(output), self.is_correction,
                                    self.vllm_importance_sampling_clip_max, self.vllm_importance_sampling_clip_min)
        self._metrics[mode]["sampling/is_cut_frac"].append(self.accelerator.gather(cut).mean().item())

    # -- sync check --------------------------------------------------------------------------------------------
    def _check_sync(self, output: dict[str, Any]) -> None:
        from align.stages.rollout import check_sync

        sampled = output.get("sampling_per_token_logps")
        trainer = output.get("old_per_token_logps")
        if sampled is not None and trainer is None:
            trainer = self._trainer_logps(output)
        diff = check_sync(self.engine, self.state.global_step, trainer, sampled, model_tokens(output),
                          self.rollout.sync_threshold, model=self.model)
        if diff is not None:
            self._metrics["train"]["sampling/sync_logp_diff"].append(diff)

    @torch.no_grad()
    def _trainer_logps(self, output: dict[str, Any]) -> torch.Tensor:
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, mask, output["completion_ids"].size(1),
                                                              batch_size=self.args.per_device_train_batch_size)
        return logps

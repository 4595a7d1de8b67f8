"""Asynchronous GRPO rollouts (`align grpo --async --max-staleness K`): the next batches are sampled while the
current one trains, from a snapshot of the policy taken when their sampling started.

How it works (one training process, hf backend):
- Every sample carries the *policy version* that produced it: the number of optimizer steps applied to the weights
  it was sampled from. The batch trained at optimizer step t (0-based) was sampled by version v ≥ t − K: its
  staleness t − v is at most `--max-staleness` K (default 1).
- Read-ahead: when the trainer fetches the batch of step t (`Trainer.get_batch_samples`), the batches of steps
  t+1 … t+K are read from the same data iterator as well, and each batch not yet being sampled is handed to a
  background thread with a copy of the trainable weights *now* (version t). The trainer then trains step t on the
  batch whose sampling started K steps earlier, waiting only if it has not finished (logged as `async/wait_s`).
  The read-ahead stops at the end of an epoch and at --max-steps (the first step of an epoch samples fresh).
- The snapshot: a second instance of the policy shares every frozen weight (the base, and TRL's frozen "ref"
  adapter) with the trained model and has its own copy of the trainable ones (the adapter; everything under
  `--adapter full`), which the background thread sets to the job's version before sampling. The live model is
  never read by the sampler, so sampling overlaps training for real; the cost is one more copy of the trainable
  weights per queued job.
- Sampling is seeded per completion (align.stages.rollout.row_seeds of the seed, the step trained on and the
  completion's index), so what a job samples depends neither on threads nor on timing.
- Importance sampling: the job also scores its own completions with its snapshot (log softmax(logits / T) at the
  sampled tokens) and returns them as the sampler's log-probs; the trainer feeds them to TRL's rollout correction
  (`--is-correction`, token_truncate by default under --async): w = min(exp(log π_θ − log π_v), --is-cap) per token,
  where π_θ is the policy at the step that trains the batch and π_v the snapshot that sampled it.
- K = 0 runs through the same machinery and waits for each batch before training it: the same completions, losses
  and weights as the synchronous run (seeded sampling, `--num-processes 1`) up to float error.
- Checkpoints: a checkpoint waits for the queued jobs and stores their results (completions, sampler log-probs,
  versions; async_rollouts-<process>.pt, plain values, loaded with weights_only=True). The resumed run reads the same
  batches again (the trainer skips only the trained ones), reuses the stored results for them and samples the rest
  from the same versions an uninterrupted run would: nothing is lost or sampled twice.
- Logged: `async/staleness_mean`, `async/staleness_max` (steps) and `async/wait_s` (seconds the trainer waited for
  the batch it trains).

How this differs from the schemes it follows:
- TRL 1.16's experimental AsyncGRPOTrainer runs a rollout worker process against a vLLM server, pushes weights over
  NCCL, tags samples with `model_version` and *drops* samples older than `max_staleness` (default 4). align never
  drops: it bounds the read-ahead, so no sample is ever older than K and none is wasted; and it runs on CPU.
- NeMo-RL's async GRPO (`max_trajectory_age_steps`, default 1) generates for a target weight version and stalls
  the trainer until the trajectories meant for the current step exist; align does the same with the target being
  the step index of the read-ahead batch, on one machine with threads instead of Ray actors and a separate vLLM.
- Both correct with the sampler's log-probs (NeMo-RL requires `use_importance_sampling_correction`); align refuses
  `--is-correction none` under --async for that reason.

Limits (refused with exit 2): the hf backend only (the vllm engines hold one adapter, the live one); one process;
--grad-accum 1 and --num-iterations 1 (one generation per optimizer step, so a step index names a batch).
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from align.config import opt
from align.errors import Problems

EVAL_SEED_OFFSET = 7919  # held-out sampling uses its own row seeds
HISTORY = 32  # trained steps whose versions and sampler log-probs stay inspectable (AsyncRollouts.history)


@dataclass
class AsyncOptions:
    async_rollouts: bool = opt(False, "Sample the next batches in a background thread while the current one trains "
                                      "(from a snapshot of the policy; hf backend).", aliases=["--async"])
    max_staleness: int = opt(1, "With --async: a batch is sampled at most this many optimizer steps before the step "
                                "that trains it (0 = wait for each batch: the synchronous result).", range="[0, inf)")

    def correction(self) -> str:
        if self.async_rollouts and self.is_correction == "auto":
            return "token_truncate"
        return super().correction()

    def check(self, problems: Problems) -> None:
        if not self.async_rollouts:
            if self.max_staleness != 1:
                problems.add(f"--max-staleness {self.max_staleness} bounds --async sampling; add --async, or drop it.")
            return
        if self.resolved_backend() != "hf":
            problems.add("--async samples from a snapshot of the policy with the hf backend; the vllm engines serve "
                         "only the live adapter. Use --backend hf with --async.")
        if self.several_processes():
            problems.add("--async runs in one process; drop --num-processes (or --async).")
        if getattr(self, "grad_accum", 1) != 1 or getattr(self, "num_iterations", 1) != 1:
            problems.add(f"--async needs one generation per optimizer step: --grad-accum 1 and --num-iterations 1, got "
                         f"{getattr(self, 'grad_accum', 1)} and {getattr(self, 'num_iterations', 1)}.")
        if getattr(self, "tool", None) or getattr(self, "environment", None):
            problems.add("--async samples single-turn rollouts; multi-turn rollouts with --tool/--environment run "
                         "synchronously. Drop --async (or the tools).")
        if self.is_correction == "none":
            problems.add("--async trains on samples up to --max-staleness steps old; their importance weights need the "
                         "sampler's log-probs. Use --is-correction auto (token_truncate) or another mode, not none.")


@dataclass
class Job:
    """One batch being sampled: the step that will train it, the version it is sampled from, its prompts."""

    step: int
    version: int
    prompt_ids: list[list[int]]
    future: Future


def sampler_copy(model):
    """A second instance of `model` that shares its frozen parameters and copies its trainable ones; returns it and
    the pairs (live parameter, copied parameter) to snapshot."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    sampler = copy.deepcopy(model, memo=dict(frozen))
    for module in sampler.modules():  # a forward set on the instance (a wrapper) still calls the live module: drop it
        module.__dict__.pop("forward", None)
    live = dict(model.named_parameters())
    pairs = [(live[name], p) for name, p in sampler.named_parameters() if id(p) not in frozen]
    for _, p in pairs:
        p.requires_grad_(False)
    sampler.eval()
    return sampler, pairs


def sampled_logps(model, prompt_ids, completion_ids, temperature: float) -> list[list[float]]:
    """log softmax(logits / T) of each completion's tokens under `model` (the sampler's log-probs), one list per row."""
    import torch

    pad = 0
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(len(c) for c in completion_ids)
    ids = torch.full((len(prompt_ids), width_p + width_c), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        ids[i, width_p:width_p + len(c)] = torch.tensor(c)
        mask[i, width_p - len(p):width_p + len(c)] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logits = logits[:, width_p - 1:-1].float() / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, width_p:].unsqueeze(-1).to(device)).squeeze(-1)
    return [logps[i, :len(c)].tolist() for i, c in enumerate(completion_ids)]


class AsyncRollouts:
    """The read-ahead queue and the background sampler of `--async` (see the module docstring)."""

    def __init__(self, engine, max_staleness: int, seed: int):
        self.engine, self.k, self.seed = engine, max_staleness, seed
        self.jobs: dict[int, Job] = {}
        self.ahead: deque = deque()  # batches read ahead of the trainer, oldest first
        self.iterator = None
        self.history: deque = deque(maxlen=HISTORY)  # the last trained steps: versions and sampler log-probs (tests)
        self.sampler = self.pairs = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="align-async-rollout")

    def attach(self, trainer) -> None:
        self.sampler, self.pairs = sampler_copy(trainer.model)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # -- the trainer's side --------------------------------------------------------------------------------------
    def batch_samples(self, trainer, epoch_iterator, num_batches: int) -> list:
        """Trainer.get_batch_samples under --async: the batch of this step, after starting to sample the next K."""
        step = trainer.state.global_step
        if epoch_iterator is not self.iterator:
            self.iterator, self.ahead = epoch_iterator, deque()
        last = trainer.state.max_steps - 1 if trainer.state.max_steps > 0 else None
        while len(self.ahead) < self.k + 1 and (last is None or step + len(self.ahead) <= last):
            try:
                self.ahead.append(next(epoch_iterator))
            except StopIteration:
                break
        for offset, batch in enumerate(self.ahead):
            if step + offset not in self.jobs:
                self.submit(trainer, step + offset, [row["prompt"] for row in batch], version=step)
        return [self.ahead.popleft()] if self.ahead else []

    def submit(self, trainer, step: int, prompts: list, version: int, seed_offset: int = 0) -> Job:
        from align.stages.rollout import render_prompts, row_seeds

        prompt_ids = render_prompts(self.engine.tokenizer, prompts)
        weights = [live.detach().clone() for live, _ in self.pairs]
        seeds = row_seeds(self.seed + seed_offset, step, 0, len(prompt_ids))
        job = Job(step, version, prompt_ids, self.pool.submit(self._sample, weights, prompt_ids, seeds))
        if not seed_offset:
            self.jobs[step] = job
        return job

    def _sample(self, weights, prompt_ids, seeds) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            for (_, mine), w in zip(self.pairs, weights, strict=True):
                mine.copy_(w)
        completion_ids, _ = self.engine.generate(self.sampler, prompt_ids, seeds=seeds)
        logps = sampled_logps(self.sampler, prompt_ids, completion_ids, self.engine.sampling.temperature)
        return {"completion_ids": completion_ids, "logprobs": logps}

    def rollout(self, prompts: list, trainer) -> dict[str, Any]:
        """GRPOTrainer's `rollout_func`: the finished job of this step (waiting for it), tagged with its version."""
        from align.stages.rollout import render_prompts

        step = trainer.state.global_step
        if not trainer.model.training:  # held-out sampling: the current policy, through the same sampler
            job = self.submit(trainer, step, prompts, version=step, seed_offset=EVAL_SEED_OFFSET)
            return self._output(job, job.future.result())
        job = self.jobs.pop(step, None)
        if job is None or job.prompt_ids != render_prompts(self.engine.tokenizer, prompts):
            raise RuntimeError(f"async rollouts: no sampled batch matches the prompts of step {step} (a bug in align's "
                               "read-ahead); rerun without --async and report it.")
        started = time.perf_counter()
        result = job.future.result()
        metrics = trainer._metrics["train"]
        metrics["async/wait_s"].append(time.perf_counter() - started)
        metrics["async/staleness_mean"].append(float(step - job.version))
        window = metrics["async/staleness_max"]  # TRL logs the mean of each list: keep one value, the window's max
        window[:] = [max([*window, float(step - job.version)])]
        self.history.append({"step": step, "version": job.version, "logprobs": result["logprobs"],
                             "completion_ids": result["completion_ids"]})
        return self._output(job, result)

    @staticmethod
    def _output(job: Job, result: dict[str, Any]) -> dict[str, Any]:
        n = len(job.prompt_ids)
        return {"prompt_ids": job.prompt_ids, "completion_ids": result["completion_ids"],
                "logprobs": result["logprobs"], "policy_version": [job.version] * n}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    @staticmethod
    def _file(checkpoint: str, process: int) -> str:
        return os.path.join(checkpoint, f"async_rollouts-{process}.pt")

    def save(self, checkpoint: str, process: int) -> None:
        """Wait for every queued job and store its result beside the checkpoint."""
        import torch

        saved = {step: {"version": job.version, "prompt_ids": job.prompt_ids, **job.future.result()}
                 for step, job in self.jobs.items()}
        torch.save(saved, self._file(checkpoint, process))

    def load(self, checkpoint: str, process: int) -> None:
        import torch

        path = self._file(checkpoint, process)
        if not os.path.isfile(path):
            return
        for step, saved in torch.load(path, weights_only=True).items():
            done: Future = Future()
            done.set_result({"completion_ids": saved["completion_ids"], "logprobs": saved["logprobs"]})
            self.jobs[int(step)] = Job(int(step), saved["version"], saved["prompt_ids"], done)


def make_async(cfg, engine) -> AsyncRollouts | None:
    """The background sampler for `--async`, or None."""
    return AsyncRollouts(engine, cfg.max_staleness, cfg.seed) if cfg.async_rollouts else None

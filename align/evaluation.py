"""`align eval`: held-out evaluation of a run (any stage) or a model — the same numbers for every stage, so the
pipeline's table compares like with like.

Prompt data (a `prompt` / `messages` / `question` column; an answer column enables task accuracy): generates
`--num-samples` completions per prompt (greedy by default) with the rollout engine, in batches, and reports

    accuracy            fraction of completions whose final number equals the answer (align's `accuracy` reward,
                        numeric mode: "The answer is 19." matches "19")
    pass@k              with k = --num-samples > 1: fraction of prompts with at least one correct completion
    reward/<name>       mean of each --reward / --reward-model source (None = not applicable, left out);
    reward              mean weighted total Σ w·r
    completion_length   mean completion tokens (EOS included; the model's own tokens with tools)
    tools/calls, tools/errors, tools/timeouts   with --tool / --environment: per completion (multi-turn rollouts,
                        align.stages.tool_rollout, as grpo samples them; the rewards read the whole conversation
                        after the prompt, accuracy the model's last turn, the KL covers the model's tokens only)
    kl                  mean over completions of Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)): the exact per-token KL over the
                        vocabulary, summed along the completion, to --reference (default: the run's parent policy —
                        its parent run, or its base model for a first stage); 0 means "same distribution"

Preference data (chosen/rejected): a reward-model run reports `preference_accuracy` = P(r(chosen) > r(rejected)) and
`margin` = mean(r(chosen) − r(rejected)); a policy the same with DPO's implicit reward r = log π(y|x) − log π_ref(y|x)
(with no reference: log π(y|x)).

Labelled data on a pointwise reward-model run (`align rm` on labels/scores; rows with its label columns): accuracy,
auc and bce (0/1 labels) or mse and pearson (scores), per head and averaged with several heads — the metrics
`align rm` logs as eval_* (align.stages.pointwise).

Raises AlignError (exit 2) for a missing target or data, a data set without prompts, or an rm run on prompt data.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.io import output_file_problem
from align.models import target_problem
from align.stages.online import ToolOptions

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig(RemoteCodeOption, ToolOptions, Config):
    positional = "target"
    target: str | None = opt(None, "A run directory (any stage) or a model directory / hub id to evaluate.")
    data: str | None = opt(None, "Held-out data: prompts (with an answer column for accuracy) or preference pairs.")
    split: str | None = opt(None, "Split of a DatasetDict directory or hub dataset (default: the first of test, validation, eval, dev it has).")
    answer_column: str = opt("answer", "Column holding the reference answer (task accuracy).")
    reward: list[str] = opt(factory=list, help="Reward specs to average over the completions (as in align grpo).")
    reward_model: str | None = opt(None, "A reward-model run (align rm) to score the completions with.")
    reference: str | None = opt(None, "Run or model for the KL / implicit reward; default: the run's parent "
                                      "policy; 'none' turns the KL off.")
    max_samples: int | None = opt(None, "Evaluate the first N examples (default: all).", range="[1, inf)")
    num_samples: int = opt(1, "Completions per prompt; k > 1 reports pass@k (use with --temperature > 0).", range="[1, inf)")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.", range="[0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling threshold.", range="(0, 1]")
    max_new_tokens: int = opt(32, "Maximum tokens per completion.", range="[1, inf)")
    batch_size: int = opt(64, "Prompts per generation / scoring batch.", range="[1, inf)")
    backend: Literal["auto", "hf", "vllm"] = opt(
        "auto", "Generation backend: hf (transformers generate) or vllm (the rollout engine's vLLM, serving the "
                "run's adapter); auto = vllm when installed and on a GPU.")
    vllm_memory: float = opt(0.3, "vllm backend: fraction of GPU memory (of host RAM on CPU) for the engine.", range="(0, 1]")
    seed: int = opt(0, "Sampling seed.")
    output: str | None = opt(None, "Write the metrics (and a few example completions) as JSON to this file.",
                             aliases=["-o"])

    def check(self, problems: Problems) -> None:
        from align.integrity import check_file_output

        check_file_output(self, problems)
        if not self.target:
            problems.add("Give a run or model to evaluate: align eval RUN --data D.")
        elif problem := target_problem(self.target):
            problems.add(problem)
        if not self.data:
            problems.add("--data is required: held-out prompts (with answers) or preference pairs.")
        if self.output and (problem := output_file_problem(self.output)) is not None:
            problems.add(problem)
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.max_samples is not None and self.max_samples <= 0:
            problems.add(f"--max-samples must be positive, got {self.max_samples}.")
        if self.temperature < 0:
            problems.add(f"--temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.add(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.num_samples > 1 and self.temperature == 0:
            problems.add(f"--num-samples {self.num_samples} with greedy decoding gives identical samples; set "
                         "--temperature > 0 (e.g. 1.0).")


# -- loading -------------------------------------------------------------------------------------------------
def default_reference(manifest: dict[str, Any] | None) -> str | None:
    """A run's parent policy: its parent run, or the base model of a first stage (None for a plain model)."""
    if manifest is None:
        return None
    return manifest.get("parent") or manifest.get("base_model")


# -- token log-probs -----------------------------------------------------------------------------------------
def _completion_logits(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int):
    """Log-softmax over the vocabulary at every completion position: a list of (len(completion), V) tensors."""
    import torch

    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        out.append(logp[i, len(p) - 1 : len(p) + len(c) - 1].cpu())
    return out


def sequence_logprobs(model, prompt_ids, completion_ids, pad: int, batch_size: int) -> list[float]:
    """log π(y|x) of each completion (sum over its tokens)."""
    import torch

    out: list[float] = []
    for i in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size]
        for logp, c in zip(_completion_logits(model, ps, cs, pad), cs, strict=True):
            out.append(logp.gather(-1, torch.tensor(c).unsqueeze(-1)).sum().item() if c else 0.0)
    return out


def sequence_kl(model, reference, prompt_ids, completion_ids, pad: int, batch_size: int,
                masks: list[list[int]] | None = None) -> list[float]:
    """Σ_t KL(π(·|x,y<t) ‖ π_ref(·|x,y<t)) along each completion (exact over the vocabulary), over the positions where
    `masks` is 1 (the model's own tokens; tool results aside) when given."""
    import torch

    out: list[float] = []
    for i in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[i : i + batch_size], completion_ids[i : i + batch_size]
        ms = masks[i : i + batch_size] if masks is not None else [None] * len(cs)
        for lp, lq, m in zip(_completion_logits(model, ps, cs, pad), _completion_logits(reference, ps, cs, pad), ms,
                             strict=True):
            per_token = (lp.exp() * (lp - lq)).sum(-1)
            if m is not None:
                per_token = per_token * torch.tensor(m, dtype=per_token.dtype)
            out.append(float(per_token.sum().clamp_min(0.0)) if len(lp) else 0.0)
    return out


# -- generation ----------------------------------------------------------------------------------------------
def make_engine(backend: str, model, tokenizer, manifest: dict[str, Any] | None, target: str, *, max_new_tokens: int,
                temperature: float, top_p: float, memory: float = 0.3, seed: int = 0):
    """The rollout engine (align.stages.rollout) for sampling from a loaded run or model."""
    import tempfile

    from align.stages.rollout import HFEngine, Sampling, choose_backend

    sampling = Sampling(max_new_tokens, temperature, top_p)
    if choose_backend(backend) == "hf":
        return HFEngine(tokenizer, sampling)
    from align.stages.vllm_backend import VLLMEngine

    if manifest is not None and (Path(target) / "model").is_dir():
        raise AlignError(f"{target} is a full fine-tuning run; --backend vllm serves adapters. Use --backend hf.")
    peft = getattr(model, "peft_config", {}).get("default")
    engine = VLLMEngine(tokenizer, sampling, base_model=manifest["base_model"] if manifest else target, memory=memory,
                        run_dir=tempfile.mkdtemp(prefix="align-eval-"), adapter=manifest.get("adapter", "lora")
                        if manifest else "lora", merged_adapters=(manifest or {}).get("merged_adapters", []),
                        lora_rank=getattr(peft, "r", 16), seed=seed)
    if peft is not None:
        engine.sync(model, 0)
    return engine


@dataclass
class Generated:
    """What `generate_completions` sampled: ids and texts per completion (prompts repeated, grouped); with tools also
    the model-token masks (1 = the model's token, 0 = a tool result), each conversation and the tool counts."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    model_mask: list[list[int]] | None = None
    conversation: list[list[dict]] | None = None
    environments: list[Any] | None = None
    stats: Any = None  # align.rewards.tools.ToolStats with tools

    def reward_keywords(self) -> dict[str, list] | None:
        """What rewards receive besides the columns with tools, as in grpo: each conversation and environment."""
        return None if self.conversation is None else {"conversation": self.conversation,
                                                       "environments": self.environments}


def generate_completions(engine, model, prompts: list[Any], *, num_samples: int, batch_size: int,
                         desc: str = "Generating", tools=None) -> Generated:
    """Every prompt repeated `num_samples` times (grouped), sampled in batches; with `tools` (ToolOptions with a tool
    or an environment) each completion is a multi-turn rollout (align.stages.tool_rollout), as in grpo."""
    from tqdm.auto import tqdm

    from align.stages.rollout import render_prompts

    tokenizer = engine.tokenizer
    repeated = [p for p in prompts for _ in range(num_samples)]
    if tools is None or not tools.enabled():
        prompt_ids = render_prompts(tokenizer, repeated)
        completion_ids: list[list[int]] = []
        for i in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, unit="batch"):
            completion_ids.extend(engine.generate(model, prompt_ids[i : i + batch_size])[0])
        return Generated(prompt_ids, completion_ids, tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
    from align.rewards.tools import ToolStats
    from align.stages.tool_rollout import run_conversations

    toolset, out = tools.toolset(), Generated([], [], [], [], [], [], ToolStats())
    for i in tqdm(range(0, len(repeated), batch_size), desc=desc, unit="batch"):
        part = run_conversations(engine, model, repeated[i : i + batch_size], toolset, tools.max_tool_calls,
                                 engine.sampling.max_new_tokens)
        out.prompt_ids += part.prompt_ids
        out.completion_ids += part.completion_ids
        out.model_mask += part.model_mask
        out.conversation += part.conversation
        out.environments += part.environments
        out.stats.add(part.stats)
    out.texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    return out


# -- evaluation ----------------------------------------------------------------------------------------------
def _mean(values: list[float | None]) -> float | None:
    applied = [v for v in values if v is not None]
    return sum(applied) / len(applied) if applied else None


def evaluate_prompts(model, tokenizer, manifest, rows: list[dict[str, Any]], cfg: EvalConfig,
                     reference=None) -> dict[str, Any]:
    """Metrics of the module docstring on prompt rows ({"prompt": messages, **columns})."""
    from align.rewards import guard_all, weighted_total
    from align.rewards.builtin import accuracy
    from align.rewards.call import build_call
    from align.rewards.reward_model import allow_remote_code

    k = cfg.num_samples
    prompts = [r["prompt"] for r in rows]
    engine = make_engine(cfg.backend, model, tokenizer, manifest, str(cfg.target), max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, memory=cfg.vllm_memory, seed=cfg.seed)
    try:
        gen = generate_completions(engine, model, prompts, num_samples=k, batch_size=cfg.batch_size, tools=cfg)
    finally:
        getattr(engine, "shutdown", engine.close)()
    prompt_ids, completion_ids, texts = gen.prompt_ids, gen.completion_ids, gen.texts
    call = build_call(rows, texts, completion_ids, k, per_completion=gen.reward_keywords())
    metrics: dict[str, Any] = {"prompts": len(rows), "num_samples": k}
    if cfg.answer_column in rows[0]:
        correct = accuracy(column=cfg.answer_column)(call.prompts, call.completions, **call.kwargs)
        metrics["accuracy"] = _mean(correct)
        if k > 1:
            groups = [correct[i : i + k] for i in range(0, len(correct), k)]
            metrics[f"pass@{k}"] = sum(any(v for v in g if v) for g in groups) / len(groups)
    specs = [*cfg.reward, *([cfg.reward_model] if cfg.reward_model else [])]
    if specs:
        guarded = allow_remote_code(guard_all(specs), cfg.trust_remote_code)
        scores = call.score(guarded)
        for g, s in zip(guarded, scores, strict=True):
            metrics[f"reward/{g.__name__}"] = _mean(s)
        metrics["reward"] = _mean(weighted_total(scores, [g.reward.weight for g in guarded]))
    masks = gen.model_mask or [[1] * len(c) for c in completion_ids]
    metrics["completion_length"] = sum(sum(m) for m in masks) / len(masks)  # the model's tokens (tool results aside)
    if gen.stats is not None:
        metrics.update({k: v / len(masks) for k, v in gen.stats.metrics().items()})  # per completion
    if reference is not None:
        metrics["kl"] = _mean(sequence_kl(model, reference, prompt_ids, completion_ids, tokenizer.pad_token_id,
                                          cfg.batch_size, masks))
    metrics["examples"] = [
        {"prompt": p[-1]["content"], "completion": t, **({"answer": r.get(cfg.answer_column)} if cfg.answer_column in r else {})}
        for p, t, r in zip(call.prompts[: 5 * k : k], texts[: 5 * k : k], rows[:5], strict=False)
    ]
    return metrics


def _pair_ids(tokenizer, prompt: list[dict], answer: list[dict], tools: list[dict] | None = None):
    """(prompt ids, answer ids) as the chat template renders them (with the pair's tools, when it has a column)."""
    from align.stages.rollout import render_prompts

    (prompt_ids,) = render_prompts(tokenizer, [prompt], tools=tools)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False, tools=tools or None)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise AlignError("The chat template does not render the prompt as a prefix of the conversation; cannot "
                         "score preference pairs with this tokenizer.")
    return prompt_ids, ids[len(prompt_ids):]


def evaluate_pairs(model, tokenizer, manifest, pairs: list[dict[str, Any]], cfg: EvalConfig, reference=None):
    """preference_accuracy and margin of a reward model or a policy (implicit reward) on preference pairs."""
    if manifest is not None and manifest.get("task") == "seq-cls":
        from align.rewards.reward_model import RewardModelScorer

        scorer = RewardModelScorer(cfg.target, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
        chosen, rejected = scorer.score_pairs(pairs)
    else:
        pad = tokenizer.pad_token_id

        def implicit(side: str) -> list[float]:
            ids = [_pair_ids(tokenizer, p["prompt"], p[side], p.get("tools")) for p in pairs]
            ps, cs = [i[0] for i in ids], [i[1] for i in ids]
            logp = sequence_logprobs(model, ps, cs, pad, cfg.batch_size)
            if reference is None:
                return logp
            ref = sequence_logprobs(reference, ps, cs, pad, cfg.batch_size)
            return [a - b for a, b in zip(logp, ref, strict=True)]

        chosen, rejected = implicit("chosen"), implicit("rejected")
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"pairs": len(pairs), "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "margin": sum(margins) / len(margins)}


def pointwise_reward_model(target: str | None) -> dict[str, Any] | None:
    """run.json's `reward_model` when `target` is a pointwise reward-model run (labelled data is scored against its
    heads), else None."""
    from align.runs import read_manifest

    if not target or not (Path(target) / "run.json").is_file():
        return None
    reward_model = read_manifest(Path(target)).get("reward_model") or {}
    return reward_model if reward_model.get("kind") == "pointwise" else None


def evaluate_labels(cfg: EvalConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A pointwise reward model's held-out metrics (accuracy/AUC/BCE or MSE/Pearson, align.stages.pointwise) on
    labelled rows: the same numbers `align rm` logs as eval_*."""
    from align.rewards.reward_model import RewardModelScorer, render
    from align.stages.pointwise import pointwise_metrics

    scorer = RewardModelScorer(cfg.target, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code,
                               all_heads=True)
    outputs = scorer.score_texts([render(scorer.tokenizer, r) for r in rows])
    reward_model = scorer.manifest["reward_model"]
    return {"rows": len(rows), **pointwise_metrics(outputs, [r["labels"] for r in rows], reward_model["objective"],
                                                   reward_model["heads"])}


def load_eval_data(cfg: EvalConfig) -> tuple[str, list[dict[str, Any]]]:
    """("prompts" | "pairs" | "labels", rows) of --data, cut to --max-samples ("labels": a pointwise reward model's
    labelled rows, by its own heads)."""
    from align.data.loading import HELD_OUT, Split, load_records
    from align.data.preference import normalize_preferences
    from align.data.prompts import normalize_prompts

    records = load_records(cfg.data, Split(cfg.split, HELD_OUT))
    reward_model = pointwise_reward_model(cfg.target)
    if {"chosen", "rejected"} <= set(records.columns()):
        kind, rows = "pairs", normalize_preferences(records)
    elif reward_model:
        from align.data.pointwise import normalize_pointwise

        kind, rows = "labels", normalize_pointwise(records, reward_model["heads"], reward_model["objective"])[0]
    else:
        kind, rows = "prompts", normalize_prompts(records)
    if not rows:
        raise AlignError(f"{cfg.data}: no examples to evaluate.")
    return kind, rows[: cfg.max_samples] if cfg.max_samples else rows


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, manifest=None) -> dict[str, Any]:
    """Evaluate `cfg.target` (or the given, already loaded model) on `cfg.data`; returns the metrics."""
    from transformers import set_seed

    from align.generate import load_target

    kind, rows = load_eval_data(cfg)
    if kind == "pairs" and cfg.enabled():
        raise AlignError(f"{cfg.data} holds preference pairs, which are scored, not sampled: --tool / --environment "
                         "apply to prompt data only. Drop them, or evaluate on prompts.")
    if model is None:
        model, tokenizer, manifest = load_target(cfg.target, cfg.trust_remote_code)
    task = (manifest or {}).get("task", "causal-lm")
    if kind == "prompts" and task == "seq-cls":
        raise AlignError(f"{cfg.target} is a reward model: evaluate it on preference pairs (chosen/rejected), or use "
                         f"it as --reward-model when evaluating a policy.")
    ref_name = cfg.reference if cfg.reference is not None else default_reference(manifest)
    reference = None
    if ref_name and ref_name.lower() != "none" and task != "seq-cls":
        reference = load_target(ref_name, cfg.trust_remote_code)[0]
    set_seed(cfg.seed)
    if kind == "labels":
        metrics = evaluate_labels(cfg, rows)
    elif kind == "pairs":
        metrics = evaluate_pairs(model, tokenizer, manifest, rows, cfg, reference)
    else:
        metrics = evaluate_prompts(model, tokenizer, manifest, rows, cfg, reference)
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            logger.warning("eval: %s is %s", key, value)
    return {"target": str(cfg.target), "data": cfg.data, "kind": kind,
            "reference": ref_name if reference is not None else None, **metrics}


def summary(result: dict[str, Any]) -> str:
    """One line per metric (examples left out)."""
    lines = [f"{result['target']} on {result['data']}"]
    for key, value in result.items():
        if key in ("target", "data", "examples"):
            continue
        lines.append(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return "\n".join(lines)


def main(cfg: EvalConfig) -> str:
    cfg.validate()
    result = evaluate(cfg)
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return summary(result)

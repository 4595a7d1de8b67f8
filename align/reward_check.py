"""`align rewards check SPEC... --data D [--from RUN --num-generations G]`: a pre-flight for reward functions,
before a long RL run.

The samples are the data's prompts, loaded exactly as grpo/ppo load them (align.data.prompts: `--split`,
`--columns`, `--system-prompt`), with either the data's own completions (a `completion` column, or the last
assistant turn of `messages`) or `--num-generations` completions per prompt sampled from `--from RUN` (or
`--model M`) at `--temperature` — with `--tool` / `--environment` as the multi-turn rollouts grpo samples
(align.stages.tool_rollout; the tool call counts are printed). Every reward receives the same call training makes (align.rewards.call),
in batches of `--batch-size` completions, through the same guard.

Printed: per-sample scores and the weighted total; per function its weight, mean, std, how many samples it applies
to, a histogram, latency p50/p95 per call and any fault (exception, NaN, wrong length, timeout, with the sample);
with G > 1 per group: the mean reward std within a group and the fraction of groups whose rewards are all equal
(GRPO's advantages are 0 there: it learns nothing from them); and a verdict in plain words. Any fault makes the
command fail (exit 2) after the report.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.stages.online import ToolOptions

IDENTICAL_WARN = 0.5  # fraction of identical-reward groups above which the verdict warns


@dataclass
class RewardsCheckConfig(RemoteCodeOption, ToolOptions, Config):
    positional = "reward"
    reward: list[str] = opt(factory=list, help="Reward specs: name, file.py:fn, package.module:fn, entry-point name "
                                               "or rm run; optional (key=value, ...) settings and @weight.")
    data: str | None = opt(None, "Prompts (as for grpo/ppo), with completions or generate them with --from.")
    from_run: str | None = opt(None, "Sample completions from this run's policy.", aliases=["--from"])
    model: str | None = opt(None, "Sample completions from this model (instead of --from).")
    split: str | None = opt(None, "Split of a DatasetDict directory or hub dataset (default: train).")
    columns: list[str] = opt(factory=list, help="Rename columns: target=source (e.g. prompt=query), as in grpo.")
    system_prompt: str | None = opt(None, "System message prepended to every prompt, as in grpo.")
    num_samples: int = opt(8, "How many prompts (data rows) to use.", range="[1, inf)")
    num_generations: int = opt(1, "Completions sampled per prompt with --from/--model (the GRPO group size); > 1 "
                                  "reports per-group reward spread.", range="[1, inf)")
    temperature: float = opt(1.0, "Sampling temperature with --from/--model (as the RL stage will sample).", range="[0, inf)")
    max_new_tokens: int = opt(32, "Tokens to generate per completion (with --from/--model).", range="[1, inf)")
    batch_size: int = opt(16, "Completions per reward call (as the RL stage's --batch-size).", range="[1, inf)")
    timeout: float = opt(60.0, "Seconds a reward function may take per call.", range="(0, inf)")
    show: int = opt(16, "Per-sample rows to print.", range="[0, inf)")

    def check(self, problems: Problems) -> None:
        if not self.reward:
            problems.add("Give at least one reward spec: align rewards check accuracy --data D.")
        if not self.data:
            problems.add("--data is required.")
        for name in ("num_samples", "num_generations", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.enabled() and not (self.from_run or self.model):
            problems.add("--tool / --environment make the completions multi-turn rollouts, which need --from RUN (or "
                         "--model M) to sample them; the data's own completions are not rollouts.")
        if self.num_generations > 1 and not (self.from_run or self.model):
            problems.add("--num-generations needs --from RUN (or --model M) to sample the completions from.")
        if self.num_generations > 1 and self.temperature <= 0:
            problems.add(f"--num-generations {self.num_generations} with --temperature {self.temperature} samples the "
                         "same completion every time; use --temperature > 0.")


# -- samples -------------------------------------------------------------------------------------------------
def _data_completion(row: dict[str, Any]) -> str | None:
    """The completion a data row carries: a `completion` column or the last assistant turn of `messages`."""
    from align.rewards.builtin import completion_text

    if row.get("completion") is not None:
        return completion_text(row["completion"])
    messages = row.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return completion_text(messages[-1:])
    return None


def samples(cfg: RewardsCheckConfig):
    """(call, k, note): the reward call for the checked samples, completions per prompt, and a note for the report."""
    from align.data.prompts import load_prompts
    from align.rewards.call import build_call

    rows, records = load_prompts(cfg.data, split=cfg.split, columns=cfg.columns, system_prompt=cfg.system_prompt)
    rows, raw = rows[: cfg.num_samples], records.rows[: cfg.num_samples]
    if cfg.from_run or cfg.model:
        from align.evaluation import generate_completions, make_engine
        from align.generate import load_target

        source = cfg.from_run or cfg.model
        model, tokenizer, manifest = load_target(source, cfg.trust_remote_code)
        engine = make_engine("hf", model, tokenizer, manifest, source, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=1.0)
        gen = generate_completions(engine, model, [r["prompt"] for r in rows], num_samples=cfg.num_generations,
                                   batch_size=cfg.batch_size, desc="Sampling", tools=cfg)
        tools = "" if gen.stats is None else (f", multi-turn with tools: {gen.stats.calls} tool calls, "
                                              f"{gen.stats.errors} errors, {gen.stats.timeouts} timeouts")
        return (build_call(rows, gen.texts, gen.completion_ids, cfg.num_generations,
                           per_completion=gen.reward_keywords()), cfg.num_generations,
                f"completions sampled from {source}{tools}")
    texts = [_data_completion(r) for r in raw]
    if any(t is None for t in texts):
        raise AlignError(f"{cfg.data} has prompts but no completions: pass --from RUN (or --model M) to sample them.")
    return (build_call(rows, texts, None, 1), 1,
            "completions from the data; completion_ids = None (no --from/--model tokenizer; training passes token ids)")


# -- scoring -------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    name: str
    spec: str
    weight: float
    values: list[float | None]
    latencies: list[float]
    fault: str | None = None


def score_all(rewards, call, batch_size: int) -> list[Scored]:
    """Each guarded reward over the call in batches (as training calls it); a fault is recorded, not raised."""
    import time

    from align.rewards import RewardError

    out = []
    n = len(call)
    for g in rewards:
        values: list[float | None] = []
        latencies: list[float] = []
        fault = None
        for i in range(0, n, batch_size):
            part = call.part(i, i + batch_size)
            start = time.perf_counter()
            try:
                values.extend(part.score([g])[0])
            except RewardError as e:
                fault = str(e)
                values.extend([None] * (n - len(values)))
                break
            finally:
                latencies.append(time.perf_counter() - start)
        out.append(Scored(g.__name__, g.reward.spec, g.reward.weight, values, latencies, fault))
    return out


def identical_fraction(values: list[float | None], k: int) -> float:
    """Fraction of the groups of k whose (applied) values are all equal."""
    groups = [[v for v in values[i : i + k] if v is not None] for i in range(0, len(values), k)]
    return sum(len(set(g)) <= 1 for g in groups) / len(groups)


def group_std(values: list[float | None], k: int) -> float:
    """Mean population std within the groups of k (applied values only)."""
    groups = [[v for v in values[i : i + k] if v is not None] for i in range(0, len(values), k)]
    return statistics.fmean(statistics.pstdev(g) if len(g) > 1 else 0.0 for g in groups)


def histogram(values: list[float], bins: int = 5) -> str:
    """`value×count` for a few distinct values, else counts in equal-width bins."""
    distinct = sorted(set(values))
    if len(distinct) <= 6:
        return "  ".join(f"{v:g}×{values.count(v)}" for v in distinct)
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return "  ".join(f"[{lo + i * width:.3g},{lo + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}×{c}"
                     for i, c in enumerate(counts))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _short(value: Any, n: int = 40) -> str:
    """A prompt's or completion's last message (or its text), on one line, cut to n characters."""
    text = value if isinstance(value, str) else value[-1].get("content", "")
    text = str(text).replace("\n", " ")
    return text[:n] + ("…" if len(text) > n else "")


# -- the report ----------------------------------------------------------------------------------------------
def verdict(scored: list[Scored], totals: list[float], k: int) -> str:
    faults = [s for s in scored if s.fault]
    if faults:
        return "FAIL: " + "; ".join(f"'{s.name}' faulted" for s in faults) + ". Fix the function before training."
    if not all(math.isfinite(t) for t in totals):
        return "FAIL: the weighted total is not a finite number for some samples. Check the weights."
    problems = []
    for s in scored:
        applied = [v for v in s.values if v is not None]
        if not applied:
            problems.append(f"'{s.name}' applies to none of the samples (always None): check its columns")
        elif len(set(applied)) == 1 and len(scored) > 1:
            problems.append(f"'{s.name}' gives {applied[0]:g} to every sample: it adds nothing to the signal here")
    if k > 1:
        same = identical_fraction(totals, k)
        if same >= IDENTICAL_WARN:
            problems.append(f"{same:.0%} of groups have identical rewards (GRPO learns nothing from them): raise the "
                            "temperature or make the reward denser (e.g. add closeness for numeric answers)")
    elif len(set(totals)) == 1:
        problems.append(f"every sample scores {totals[0]:g}: the reward cannot tell these completions apart")
    if problems:
        return "WARNING: " + "; ".join(problems) + "."
    return (f"OK: rewards differ within {1 - identical_fraction(totals, k):.0%} of groups." if k > 1
            else "OK: the rewards apply and vary across the samples.")


def report(cfg: RewardsCheckConfig, call, k: int, note: str, scored: list[Scored], totals: list[float]) -> str:
    lines = [f"{len(call) // k} prompts × {k} completions; {note}.", ""]
    lines.append(" | ".join(["#", "prompt", "completion", *(s.name for s in scored), "total"]))
    for i in range(min(len(call), cfg.show)):
        cells = ["-" if s.values[i] is None else f"{s.values[i]:.3f}" for s in scored]
        lines.append(" | ".join([str(i), _short(call.prompts[i]), _short(call.completions[i], 24), *cells,
                                 f"{totals[i]:.3f}"]))
    if len(call) > cfg.show:
        lines.append(f"... {len(call) - cfg.show} more (--show N)")
    lines.append("")
    for s in scored:
        applied = [v for v in s.values if v is not None]
        ms = [1000 * t for t in s.latencies]
        stats = (f"mean {statistics.fmean(applied):.3f}, std {statistics.pstdev(applied):.3f}" if applied else "n/a")
        lines.append(f"{s.name} ({s.spec}), weight {s.weight:g}: {stats} over {len(applied)}/{len(s.values)} samples; "
                     f"latency p50 {_percentile(ms, 0.5):.1f} ms, p95 {_percentile(ms, 0.95):.1f} ms per call of "
                     f"≤{cfg.batch_size}")
        if applied:
            lines.append(f"    histogram: {histogram(applied)}")
        if k > 1 and applied:
            lines.append(f"    groups: mean within-group std {group_std(s.values, k):.3f}, "
                         f"{identical_fraction(s.values, k):.0%} of groups all equal")
        lines.append(f"    fault: {s.fault}" if s.fault else "    returns list[float | None]: ok")
    if k > 1:
        lines.append(f"total: mean within-group std {group_std(totals, k):.3f}, "
                     f"{identical_fraction(totals, k):.0%} of groups all equal")
    lines += ["", verdict(scored, totals, k)]
    return "\n".join(lines)


def main(cfg: RewardsCheckConfig) -> str:
    cfg.validate()
    from align.rewards import guard_all, weighted_total

    rewards = guard_all(cfg.reward, timeout=cfg.timeout)
    call, k, note = samples(cfg)
    scored = score_all(rewards, call, cfg.batch_size)
    totals = weighted_total([s.values for s in scored], [s.weight for s in scored])
    text = report(cfg, call, k, note, scored, totals)
    if any(s.fault for s in scored) or not all(math.isfinite(t) for t in totals):
        raise AlignError(text)
    return text

"""`align pairs`: on-policy preference pairs — sample from a policy, label with a verifier, keep (best, worst).

The recipe real users follow before DPO or reward-model training: for each prompt, sample `--num-generations`
completions from the policy (`--from RUN`, or `--model M`), score each with the rewards (`--reward accuracy`, any
spec as in grpo; several are summed with their weights), and write one pair per prompt whose scores differ:
chosen = a highest-scoring completion, rejected = a lowest-scoring one (identical texts never form a pair). The
pairs are the policy's own outputs, so DPO from that policy starts on-distribution, and a reward model trained on
them learns to tell its right answers from its wrong ones.

Writes RUN/pairs.jsonl ({"prompt": messages, "chosen": [assistant], "rejected": [assistant], "margin", plus the
prompt data's other columns; with tools also "tools", and chosen/rejected are conversations, below) and
RUN/run.json (stage "pairs"; metrics: prompts, pairs, the fractions of groups whose completions all scored the
same). `align dpo --data RUN/pairs.jsonl`, or a stage name in `align run`.

`--unpaired` writes unpaired feedback for `align kto` instead: one row per distinct completion of each prompt,
{"prompt", "completion": [assistant], "label": total score >= --desirable-score, "score", plus the other columns}.
Unlike pairs, a group whose completions all scored the same still gives rows (all desirable or all undesirable).

With tools (`--tool SPEC`, `--environment SPEC`, `--max-tool-calls`, `--tool-timeout`; align.rewards.tools), each
completion is a multi-turn rollout sampled exactly as grpo and eval sample it (align.stages.tool_rollout: the model's
calls are run, their results appended as `tool` messages, until it answers), and the rewards score the whole
conversation as in grpo (`completions`: the decoded turns and tool results; `conversation`, `environments` keywords;
accuracy reads the model's last turn). chosen / rejected (or completion) are then those conversations in the data form
dpo, kto and rm read: assistant turns with `tool_calls` (align.stages.tool_rollout.as_messages), `tool` messages, the
final answer; each row gets the `tools` column (the tools' JSON schemas) so the chat template renders the same system
turn the rollouts saw. run.json records the tools and the tool-call counts (tools/calls, errors, timeouts per
completion).

Raises AlignError (exit 2) for config, data, parent, reward- and tool-spec problems (and a chat template that does
not render tools), all at once, before sampling.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.io import output_path_problem
from align.stages.online import RewardOptions, ToolOptions, load_prompt_data

logger = logging.getLogger(__name__)


@dataclass
class PairsConfig(RemoteCodeOption, RewardOptions, ToolOptions, Config):
    model: str | None = opt(None, "Sample from this model (a directory or hub id) instead of a run.")
    from_run: str | None = opt(None, "Sample from this finished run's policy.", aliases=["--from"])
    data: str | None = opt(None, "Prompts (a prompt/messages/question column; other columns go to the rewards).")
    split: str | None = opt(None, "Split of a DatasetDict directory or hub dataset (default: train).")
    columns: list[str] = opt(factory=list, help="Column renames NAME=COLUMN, e.g. --columns prompt=query.")
    system_prompt: str | None = opt(None, "System message added to prompts that have none.")
    output: str | None = opt(None, "Run directory to write (pairs.jsonl, run.json).", aliases=["-o"])
    num_generations: int = opt(8, "Completions sampled per prompt.", range="[2, inf)")
    pairs_per_prompt: int = opt(1, "Most pairs written per prompt: the best completion against up to N distinct "
                                   "lower-scoring ones (the lowest first).", range="[1, inf)")
    temperature: float = opt(1.0, "Sampling temperature (> 0: the pairs need different completions).", range="(0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling threshold.", range="(0, 1]")
    max_completion_length: int = opt(64, "Maximum tokens per completion.", range="[1, inf)")
    batch_size: int = opt(256, "Completions generated per batch.", range="[1, inf)")
    backend: Literal["auto", "hf", "vllm"] = opt("auto", "Sampling backend: hf (transformers generate) or vllm (the "
                                                         "rollout engine); auto = vllm when installed and on a GPU.")
    vllm_memory: float = opt(0.3, "vllm backend: fraction of GPU memory (of host RAM on CPU) for the engine.", range="(0, 1]")
    max_prompts: int | None = opt(None, "Use the first N prompts (default: all).", range="[1, inf)")
    unpaired: bool = opt(False, "Write unpaired feedback for align kto (prompt, completion, label) instead of pairs: "
                                "every distinct completion, labelled by --desirable-score.")
    desirable_score: float = opt(0.5, "With --unpaired: a completion whose total reward is at least this is labelled "
                                      "desirable (label true), otherwise undesirable.")
    seed: int = opt(42, "Sampling seed.")
    resume: bool = opt(False, "Redo an interrupted pairs run in --output (sampling restarts; it has no checkpoints).")
    overwrite: bool = opt(False, "Replace an existing run in --output.")
    eval_data: ClassVar[None] = None  # read by the shared prompt loader: pairs has no held-out split
    eval_split: ClassVar[float] = 0.0

    def check(self, problems: Problems) -> None:
        if not (self.model or self.from_run):
            problems.add("Give the policy to sample from: --from RUN (or --model M).")
        if self.model and self.from_run:
            problems.add("Give --from RUN or --model M, not both.")
        if not self.data:
            problems.add("--data is required: prompts to sample completions for.")
        if not self.output:
            problems.add("--output is required: the run directory to write.")
        elif (problem := output_path_problem(self.output)) is not None:
            problems.add(problem)
        if self.num_generations < 2:
            problems.add(f"--num-generations must be at least 2 (a pair needs two completions), got {self.num_generations}.")
        if self.temperature <= 0:
            problems.add(f"--temperature must be > 0 (greedy sampling gives one completion per prompt), got {self.temperature}.")
        if self.unpaired and self.pairs_per_prompt != 1:
            problems.add(f"--pairs-per-prompt {self.pairs_per_prompt}: --unpaired writes every distinct completion, "
                         "not pairs. Drop one of the two.")
        if not self.unpaired and self.desirable_score != 0.5:
            problems.add(f"--desirable-score {self.desirable_score} labels unpaired feedback; add --unpaired (or drop it).")
        for name in ("max_completion_length", "batch_size", "pairs_per_prompt"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")


def _answers(texts: list[str], answers: list[list[dict[str, Any]]] | None) -> list[list[dict[str, Any]]]:
    """Each completion as messages: `answers` (multi-turn conversations), or one assistant message per text."""
    return answers if answers is not None else [[{"role": "assistant", "content": t}] for t in texts]


def make_pairs(rows: list[dict[str, Any]], texts: list[str], totals: list[float], k: int,
               per_prompt: int = 1, answers: list[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Up to `per_prompt` pairs per prompt group of `k` scored completions: a best completion against distinct
    lower-scoring texts, the lowest-scoring first; groups whose scores are all equal give none. `answers`: each
    completion's messages when it is a conversation (with tools), written as chosen / rejected instead of its text."""
    answers = _answers(texts, answers)
    pairs = []
    for i, row in enumerate(rows):
        group = [(texts[j], totals[j], answers[j]) for j in range(i * k, (i + 1) * k)]
        best = max(group, key=lambda g: g[1])
        seen: set[str] = {best[0]}
        for text, score, answer in sorted(group, key=lambda g: g[1]):
            if len(seen) > per_prompt or score >= best[1]:
                break
            if text in seen:
                continue
            seen.add(text)
            pairs.append({**row, "chosen": best[2], "rejected": answer, "margin": best[1] - score})
    return pairs


def make_feedback(rows: list[dict[str, Any]], texts: list[str], totals: list[float], k: int,
                  desirable_score: float, answers: list[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One unpaired row per distinct completion of each prompt group of `k` scored completions, labelled
    desirable when its total score is at least `desirable_score` (the first of identical texts counts); `answers`
    as in make_pairs."""
    answers = _answers(texts, answers)
    out = []
    for i, row in enumerate(rows):
        seen: set[str] = set()
        for j in range(i * k, (i + 1) * k):
            if texts[j] not in seen:
                seen.add(texts[j])
                out.append({**row, "completion": answers[j], "label": totals[j] >= desirable_score, "score": totals[j]})
    return out


def main(cfg: PairsConfig) -> Path:
    """Sample, score and pair as configured; returns the run directory."""
    from align.evaluation import generate_completions, make_engine
    from align.generate import load_target
    from align.rewards import weighted_total
    from align.rewards.call import build_call
    from align.stages.common import seed_everything, start_run, validate_stage
    from align.stages.tool_rollout import as_messages

    run, data = validate_stage(cfg, "pairs", load_prompt_data)
    start_run(run, cfg)
    rows, _, datasets = data
    rows = rows[: cfg.max_prompts] if cfg.max_prompts else rows
    source = cfg.from_run or cfg.model
    with run.lifecycle(stage="pairs", task="pairs", config=cfg.to_dict(), datasets=datasets, seed=cfg.seed,
                       parent=str(Path(cfg.from_run).resolve()) if cfg.from_run else None, rewards=cfg.reward_manifest(),
                       tools=cfg.tools_manifest()):
        model, tokenizer, manifest = load_target(source, cfg.trust_remote_code)
        seed_everything(cfg.seed)
        k = cfg.num_generations
        engine = make_engine(cfg.backend, model, tokenizer, manifest, source, max_new_tokens=cfg.max_completion_length,
                             temperature=cfg.temperature, top_p=cfg.top_p, memory=cfg.vllm_memory, seed=cfg.seed)
        try:
            gen = generate_completions(engine, model, [r["prompt"] for r in rows], num_samples=k,
                                       batch_size=cfg.batch_size, desc="Sampling", tools=cfg)
        finally:
            getattr(engine, "shutdown", engine.close)()
        completion_ids, texts = gen.completion_ids, gen.texts
        rewards = cfg.guarded_rewards()
        scores = build_call(rows, texts, completion_ids, k, per_completion=gen.reward_keywords()).score(rewards)
        totals = weighted_total(scores, [g.reward.weight for g in rewards])
        answers = None
        if cfg.enabled():  # the conversations, in the data form; the tools column renders the same system turn
            schemas = cfg.toolset().schemas()
            answers = [as_messages(tokenizer, c, schemas) for c in gen.conversation]
            rows = [{**r, "tools": schemas} for r in rows]
        if cfg.unpaired:
            pairs = make_feedback(rows, texts, totals, k, cfg.desirable_score, answers)
        else:
            pairs = make_pairs(rows, texts, totals, k, cfg.pairs_per_prompt, answers)
        if not pairs:
            raise AlignError(f"align pairs: every group of {k} completions scored the same, so no pair could be "
                             "formed. Raise --temperature or --num-generations, or use a denser reward.")
        groups = [totals[i : i + k] for i in range(0, len(totals), k)]
        metrics = {"prompts": len(rows), ("rows" if cfg.unpaired else "pairs"): len(pairs),
                   **({"desirable": sum(p["label"] for p in pairs)} if cfg.unpaired else {}),
                   "mean_reward": sum(totals) / len(totals),
                   "groups_all_best": sum(min(g) == max(g) == max(totals) for g in groups) / len(groups),
                   "groups_all_same": sum(min(g) == max(g) for g in groups) / len(groups),
                   **({name: v / len(texts) for name, v in gen.stats.metrics().items()} if gen.stats else {})}
        tmp = run.path / ".pairs.jsonl.partial"
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tmp.replace(run.path / "pairs.jsonl")
        run.update_manifest(metrics=metrics)
        logger.info("%d %s from %d prompts (%.0f%% of groups all scored the same)", len(pairs),
                    f"unpaired rows ({metrics['desirable']} desirable)" if cfg.unpaired else "pairs", len(rows),
                    100 * metrics["groups_all_same"])
    return run.path

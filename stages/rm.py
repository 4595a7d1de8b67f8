"""`align rm`: a Bradley–Terry reward model on TRL's RewardTrainer, and `align rm score`.

Model: a sequence-classification head with one output on a causal-LM base (the score reads the last token)
or an encoder base (BERT-like, the pooled first token). PEFT adapters train with the new head saved alongside
(PEFT's SEQ_CLS task keeps `score`/`classifier` trainable and in the adapter); `--adapter full` trains all.
`--from RUN` starts from a finished run (commonly the SFT run the policy also starts from): its adapter is
merged into the base and a fresh adapter + head are trained on top (align.handoff).

Loss: -log σ(r(x, y_w) − r(x, y_l) − margin), margin from the data's optional `margin` column (else 0), plus
`--center-rewards-coefficient`·E[(r_w + r_l)²] when set. Logged: accuracy (share of pairs with r_w > r_l),
margin, on train and eval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from align.adapters import AdapterOptions
from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.stages.common import as_dataset, finish_stage, launch_or_join, start_stage, trainer_arguments
from align.stages.dpo import load_preference_data
from align.stages.options import DataOptions, ModelOptions, TrainOptions


@dataclass
class RMConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(1e-4, "Peak learning rate.", range="(0, inf)")
    center_rewards_coefficient: float | None = opt(None, "Weight of the reward-centering term E[(r_w + r_l)^2].", range="[0, inf)")


def main(cfg: RMConfig) -> Path:
    """Train a reward model as configured; returns the run directory."""
    from trl import RewardConfig, RewardTrainer

    if (workers_run := launch_or_join(cfg, "rm", load_preference_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "rm", load_preference_data, task="seq-cls", peft_task="SEQ_CLS")
    policy = started.policy
    policy.model.config.pad_token_id = policy.tokenizer.pad_token_id
    args = RewardConfig(**trainer_arguments(cfg, started.run, started.evaluation is not None),
                        max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient)
    return finish_stage(
        started, cfg, stage="rm", task="seq-cls",
        make_trainer=lambda callbacks: RewardTrainer(
            model=policy.model, args=args, processing_class=policy.tokenizer, train_dataset=as_dataset(started.train),
            eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )


@dataclass
class ScoreConfig(RemoteCodeOption, Config):
    positional = "run"
    run: str | None = opt(None, "The reward-model run (align rm --output).")
    data: str | None = opt(None, "Pairs to score: preference data (chosen/rejected) or prompt/completion data.")
    split: str | None = opt(None, "Split of a DatasetDict directory or hub dataset (default: train).")
    columns: list[str] = opt(factory=list, help="Column renames NAME=COLUMN.")
    output: str | None = opt(None, "Write one JSON object per example here (default: print them).", aliases=["-o"])
    batch_size: int = opt(16, "Examples per forward pass.", range="[1, inf)")

    def check(self, problems: Problems) -> None:
        from align.integrity import check_file_output

        check_file_output(self, problems)
        if not self.run:
            problems.add("Give the reward-model run: align rm score RUN --data D.")
        if not self.data:
            problems.add("--data is required.")


def score_main(cfg: ScoreConfig) -> str:
    """Score a dataset with a reward model; preference data also reports accuracy."""
    cfg.validate()
    from align.data import load_examples
    from align.data.loading import load_records
    from align.data.preference import normalize_preferences
    from align.rewards.reward_model import RewardModelScorer

    records = load_records(cfg.data, cfg.split)
    scorer = RewardModelScorer(cfg.run, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
    if {"chosen", "rejected"} <= set(records.columns()):
        pairs = normalize_preferences(records, cfg.columns)
        chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
        rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
        rows = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]
        summary = f"accuracy {sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows):.3f} on {len(rows)} pairs"
    else:
        examples, fmt, _ = load_examples(cfg.data, split=cfg.split, columns=cfg.columns)
        if fmt == "text":
            raise AlignError(f"{cfg.data}: plain text has no prompt/completion to score. Give prompt/completion "
                             "or preference data.")
        prompts = [[m for m in ex["messages"][:-1]] for ex in examples]
        scores = scorer.score(prompts, [ex["messages"][-1:] for ex in examples])
        rows = [{"score": s} for s in scores]
        summary = f"mean score {sum(scores) / len(scores):.4f} over {len(scores)} examples"
    lines = "\n".join(json.dumps(r) for r in rows)
    if cfg.output:
        Path(cfg.output).write_text(lines + "\n")
        return summary
    return lines + "\n" + summary

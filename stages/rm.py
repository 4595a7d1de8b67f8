"""`align rm`: a reward model — Bradley–Terry on pairs (TRL's RewardTrainer), or pointwise on labelled/scored rows
(align.stages.pointwise: BCE for 0/1 labels, MSE for scores, one head per label column) — and `align rm score`.

Format: pairs (chosen/rejected columns) train Bradley–Terry; rows with a `label`/`score` column (or the
`--label-columns`) train pointwise; `--rm-format` forces one and refuses data of the other shape. run.json's
`reward_model` records {kind: pairwise|pointwise, heads, objective}.

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
from typing import Literal

from align.adapters import AdapterOptions
from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.stages.common import (
    as_dataset,
    finish_stage,
    launch_or_join,
    load_train_eval,
    start_stage,
    trainer_arguments,
)
from align.stages.dpo import load_preference_data
from align.stages.options import DataOptions, ModelOptions, TrainOptions


@dataclass
class RMConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(1e-4, "Peak learning rate.", range="(0, inf)")
    center_rewards_coefficient: float | None = opt(None, "Pairwise: weight of the reward-centering term "
                                                         "E[(r_w + r_l)^2].", range="[0, inf)")
    rm_format: Literal["auto", "pairwise", "pointwise"] = opt(
        "auto", "pairwise = Bradley-Terry on chosen/rejected pairs; pointwise = one text (or prompt + completion) with a "
                "0/1 label or a numeric score; auto = pairwise when the data has chosen/rejected, else pointwise.")
    label_columns: list[str] = opt(factory=list, help="Pointwise: the target columns, one head each (default: 'label', "
                                   "else 'score'), e.g. --label-columns helpful harmless.")
    objective: Literal["auto", "bce", "mse"] = opt(
        "auto", "Pointwise loss: bce = binary cross-entropy on 0/1 labels, mse = regression on scores; auto = bce for "
                "'label' and all-0/1 columns, mse for 'score' and other numbers.")

    def check(self, problems: Problems) -> None:
        if self.rm_format == "pairwise" and (self.label_columns or self.objective != "auto"):
            problems.add("--label-columns/--objective are pointwise options; --rm-format pairwise trains on pairs. Drop "
                         "them, or use --rm-format pointwise.")
        if len(set(self.label_columns)) != len(self.label_columns):
            problems.add(f"--label-columns names a column twice: {' '.join(self.label_columns)}.")


def data_format(cfg: RMConfig) -> str:
    """pairwise or pointwise: --rm-format, else what --data holds (chosen/rejected columns: pairwise)."""
    if cfg.rm_format != "auto":
        return cfg.rm_format
    from align.data.formats import parse_column_map
    from align.data.loading import load_records

    mapping = parse_column_map(list(cfg.columns))
    columns = {mapping.get(c, c) for c in load_records(cfg.data, cfg.split).columns()}
    return "pairwise" if {"chosen", "rejected"} <= columns else "pointwise"


def load_rm_data(cfg: RMConfig):
    """(train, eval, datasets manifest) for the format of the data (see `data_format`)."""
    if data_format(cfg) == "pairwise":
        if cfg.label_columns or cfg.objective != "auto":
            raise AlignError(f"{cfg.data}: preference pairs (chosen/rejected) train a pairwise reward model; "
                             "--label-columns/--objective apply to labelled rows. Drop them, or give labelled data.")
        return load_preference_data(cfg)
    from align.data.pointwise import load_pointwise

    if cfg.center_rewards_coefficient is not None:
        raise AlignError(f"{cfg.data}: labelled rows train a pointwise reward model; --center-rewards-coefficient "
                         "applies to pairs. Drop it.")

    def load(spec: str, split):
        if cfg.rm_format == "pointwise":
            refuse_pairs(spec, split)
        return load_pointwise(spec, split=split, label_columns=cfg.label_columns, objective=cfg.objective,
                              columns=cfg.columns, system_prompt=cfg.system_prompt)

    train, evaluation, datasets = load_train_eval(cfg, load)
    if "eval" in datasets and "heads" in datasets["eval"] and \
            (datasets["eval"]["heads"], datasets["eval"]["objective"]) != (datasets["train"]["heads"], datasets["train"]["objective"]):
        raise AlignError(f"--eval-data {cfg.eval_data}: its targets ({', '.join(datasets['eval']['heads'])}, "
                         f"{datasets['eval']['objective']}) differ from --data's ({', '.join(datasets['train']['heads'])}, "
                         f"{datasets['train']['objective']}). Give both the same columns, or set --label-columns/--objective.")
    return train, evaluation, datasets


def refuse_pairs(spec: str, split) -> None:
    from align.data.loading import load_records

    records = load_records(spec, split)
    if {"chosen", "rejected"} <= set(records.columns()):
        raise AlignError(f"{records.source}: --rm-format pointwise, but {records.locations[0]} holds a preference "
                         "pair (chosen/rejected). Drop --rm-format (pairs train Bradley-Terry), or give labelled rows.")


def main(cfg: RMConfig) -> Path:
    """Train a reward model as configured; returns the run directory."""
    if (workers_run := launch_or_join(cfg, "rm", load_rm_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    heads = planned_heads(cfg)  # the head size the model is built with; None: pairwise
    pointwise = heads is not None
    heads = heads or ["reward"]
    started = start_stage(cfg, "rm", load_rm_data, task="seq-cls", peft_task="SEQ_CLS", num_labels=len(heads))
    policy = started.policy
    policy.model.config.pad_token_id = policy.tokenizer.pad_token_id
    args = trainer_arguments(cfg, started.run, started.evaluation is not None)
    if pointwise:
        from align.stages.pointwise import make_trainer

        train = started.datasets["train"]
        reward_model = {"kind": "pointwise", "heads": train["heads"], "objective": train["objective"]}
        return finish_stage(started, cfg, stage="rm", task="seq-cls", reward_model=reward_model,
                            make_trainer=make_trainer(started, cfg, args, reward_model))
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**args, max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient)
    return finish_stage(
        started, cfg, stage="rm", task="seq-cls", reward_model={"kind": "pairwise", "heads": heads},
        make_trainer=lambda callbacks: RewardTrainer(
            model=policy.model, args=args, processing_class=policy.tokenizer, train_dataset=as_dataset(started.train),
            eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )


def planned_heads(cfg: RMConfig) -> list[str] | None:
    """The pointwise target columns of --data (None: pairwise data, or data that start_stage's validation refuses
    with every other problem)."""
    from align.data.formats import parse_column_map
    from align.data.loading import load_records
    from align.data.pointwise import target_columns

    try:
        if not cfg.data or data_format(cfg) != "pointwise":
            return None
        mapping = parse_column_map(list(cfg.columns))
        columns = [mapping.get(c, c) for c in load_records(cfg.data, cfg.split).columns()]
    except AlignError:
        return None
    return target_columns(columns, list(cfg.label_columns)) or None


@dataclass
class ScoreConfig(RemoteCodeOption, Config):
    positional = "run"
    run: str | None = opt(None, "The reward-model run (align rm --output).")
    data: str | None = opt(None, "What to score: preference pairs (chosen/rejected), prompt/completion or text rows, or "
                                 "a pointwise RM's labelled rows (then its metrics too).")
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
    """Score a dataset with a reward model: preference data also reports accuracy; labelled rows on a pointwise RM
    its held-out metrics. Each output line: `score` (one head) or `scores` {head: output} (several)."""
    cfg.validate()
    from align.data.loading import load_records
    from align.data.preference import normalize_preferences
    from align.rewards.reward_model import RewardModelScorer, render

    records = load_records(cfg.data, cfg.split)
    scorer = RewardModelScorer(cfg.run, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code,
                               all_heads=True)
    if {"chosen", "rejected"} <= set(records.columns()):
        if len(scorer.heads) > 1:
            raise AlignError(f"{cfg.run} has {len(scorer.heads)} heads ({', '.join(scorer.heads)}): preference "
                             "accuracy needs one score. Score labelled or prompt/completion rows instead.")
        pairs = normalize_preferences(records, cfg.columns)
        chosen, rejected = scorer.score_pairs(pairs)
        rows = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]
        summary = f"accuracy {sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows):.3f} on {len(rows)} pairs"
    else:
        examples, metrics = score_examples(cfg, records, scorer)
        outputs = scorer.score_texts([render(scorer.tokenizer, e) for e in examples])
        rows = [{"score": o[0]} if len(o) == 1 else {"scores": dict(zip(scorer.heads, o, strict=True))} for o in outputs]
        summary = f"mean score {sum(o[0] for o in outputs) / len(outputs):.4f} over {len(outputs)} examples" \
            if len(scorer.heads) == 1 else f"{len(outputs)} examples, heads {', '.join(scorer.heads)}"
        if metrics is not None:
            summary += "; " + ", ".join(f"{k} {v:.4f}" for k, v in metrics(outputs).items())
    lines = "\n".join(json.dumps(r) for r in rows)
    if cfg.output:
        Path(cfg.output).write_text(lines + "\n")
        return summary
    return lines + "\n" + summary


def score_examples(cfg: ScoreConfig, records, scorer):
    """(examples to score: {"text"} or {"prompt", "completion"}, and for labelled rows of a pointwise RM a function
    outputs -> metrics, else None)."""
    from align.data import load_examples
    from align.data.formats import parse_column_map
    from align.data.pointwise import normalize_pointwise
    from align.stages.pointwise import pointwise_metrics

    reward_model = scorer.manifest.get("reward_model") or {}
    mapping = parse_column_map(list(cfg.columns))
    columns = {mapping.get(c, c) for c in records.columns()}
    if reward_model.get("kind") == "pointwise" and set(reward_model["heads"]) <= columns:
        examples, objective = normalize_pointwise(records, reward_model["heads"], reward_model["objective"], cfg.columns)
        return examples, lambda outputs: pointwise_metrics(outputs, [e["labels"] for e in examples], objective,
                                                           reward_model["heads"])
    if "text" in columns:
        texts = [{mapping.get(k, k): v for k, v in row.items()}.get("text") for row in records.rows]
        bad = next((where for t, where in zip(texts, records.locations, strict=True) if not isinstance(t, str)), None)
        if bad:
            raise AlignError(f"{bad}: field 'text' must be a string. Fix the row or drop it.")
        return [{"text": t} for t in texts], None
    examples, _, _ = load_examples(cfg.data, split=cfg.split, columns=cfg.columns)
    return [{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:]} for ex in examples], None

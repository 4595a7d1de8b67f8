"""Pointwise reward models and classifiers: `align rm` on labelled or scored rows (align.data.pointwise).

TRL's RewardTrainer is pairwise only, so this trains transformers' `Trainer` on the same sequence-classification
model `align rm` builds (one output per label column; PEFT's SEQ_CLS task keeps the head trainable and saves it in
the adapter), through the same lifecycle (align.stages.common). The loss is the model's own, chosen by its
`problem_type`:

    bce  (labels 0/1):  mean over rows and heads of  −[y·log σ(z) + (1−y)·log(1−σ(z))]     (BCEWithLogitsLoss)
    mse  (scores):      mean over rows and heads of  (z − y)²                                (MSELoss)

z is the head's output on the rendered text (align.rewards.reward_model.render: a `text` as is, a prompt +
completion through the chat template, no added special tokens — exactly what the scorer reads later, so the
trained head is the reward ppo/grpo see).

Held-out metrics (`pointwise_metrics`, logged as eval_*; with several heads per head as NAME/HEAD and their mean
as NAME): bce → `accuracy` (z > 0 ⇔ y = 1), `auc` (ROC AUC by the rank formula
(Σ ranks of positives − P(P+1)/2) / (P·N), ties at their average rank; left out when a class is absent) and `bce`;
mse → `mse` and `pearson` (left out when either side is constant).
"""

from __future__ import annotations

import math
from typing import Any

PROBLEM_TYPES = {"bce": "multi_label_classification", "mse": "regression"}


def auc(scores: list[float], labels: list[float]) -> float | None:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting ½ (rank formula)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # tied scores share their average rank
        i = j + 1
    positives = sum(1 for y in labels if y == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def head_metrics(outputs: list[float], targets: list[float], objective: str) -> dict[str, float]:
    """One head's metrics (see the module docstring)."""
    n = len(outputs)
    if objective == "bce":
        found = {"accuracy": sum((z > 0) == (y == 1) for z, y in zip(outputs, targets, strict=True)) / n,
                 "auc": auc(outputs, targets),
                 "bce": sum(_softplus(-z) if y == 1 else _softplus(z) for z, y in zip(outputs, targets, strict=True)) / n}
    else:
        found = {"mse": sum((z - y) ** 2 for z, y in zip(outputs, targets, strict=True)) / n,
                 "pearson": pearson(outputs, targets)}
    return {k: v for k, v in found.items() if v is not None}


def pointwise_metrics(outputs: list[list[float]], targets: list[list[float]], objective: str,
                      heads: list[str]) -> dict[str, float]:
    """Metrics of [rows][heads] outputs against targets: per head (NAME/HEAD, several heads) and their mean (NAME)."""
    per_head = [head_metrics([o[h] for o in outputs], [t[h] for t in targets], objective) for h in range(len(heads))]
    if len(heads) == 1:
        return per_head[0]
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for m in per_head for k in m):
        values = [m[name] for m in per_head if name in m]
        out[name] = sum(values) / len(values)
        out.update({f"{name}/{head}": m[name] for head, m in zip(heads, per_head, strict=True) if name in m})
    return out


def tokenized(rows: list[dict[str, Any]] | None, tokenizer, max_length: int):
    """A datasets.Dataset of input_ids / attention_mask / labels for the Trainer (None for None)."""
    import datasets

    from align.rewards.reward_model import render

    if rows is None:
        return None
    encoded = tokenizer([render(tokenizer, r) for r in rows], add_special_tokens=False, truncation=True,
                        max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                                       "labels": [r["labels"] for r in rows]})


def make_trainer(started, cfg, args: dict[str, Any], reward_model: dict[str, Any]):
    """`make_trainer(callbacks)` for align.stages.common.finish_stage: transformers' Trainer with the model's own
    BCE or MSE loss and held-out `pointwise_metrics`."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    policy = started.policy
    policy.model.config.problem_type = PROBLEM_TYPES[reward_model["objective"]]
    policy.tokenizer.padding_side = "right"
    train = tokenized(started.train, policy.tokenizer, cfg.max_length)
    evaluation = tokenized(started.evaluation, policy.tokenizer, cfg.max_length)

    def compute_metrics(prediction) -> dict[str, float]:
        outputs, targets = prediction.predictions, prediction.label_ids
        return pointwise_metrics(outputs.reshape(len(outputs), -1).tolist(), targets.reshape(len(targets), -1).tolist(),
                                 reward_model["objective"], reward_model["heads"])

    def make(callbacks):
        trainer = Trainer(
            model=policy.model, args=TrainingArguments(**args, label_names=["labels"]), train_dataset=train,
            eval_dataset=evaluation, processing_class=policy.tokenizer, callbacks=callbacks,
            data_collator=DataCollatorWithPadding(policy.tokenizer), compute_metrics=compute_metrics,
        )
        # The model's forward takes **kwargs, so the Trainer would take its BCE/MSE (a mean over this process's rows)
        # for a sum over the global batch divided by `num_items_in_batch`: it would multiply it by the process count
        # and skip the division by --gradient-accumulation-steps (loss and gradients 2x with 2 processes or 2 steps).
        trainer.model_accepts_loss_kwargs = False
        return trainer

    return make

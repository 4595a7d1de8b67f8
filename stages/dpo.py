"""`align dpo`: Direct Preference Optimization on TRL's DPOTrainer.

Starts from a base (`--model`, fresh adapter) or from a finished policy run (`--from RUN`, see align.handoff:
continue the parent's adapter by default, or merge it and train a fresh one). The reference model is the
starting policy, frozen: TRL copies the trainable adapter into a frozen "ref" adapter of the same model (no
second model in memory), or keeps a copy of the model for full fine-tuning. Hence the first step's loss is
ln 2 and the reward margins are 0, whatever the parent's adapter did.

Loss (sigmoid, the default): -log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]),
with label smoothing ε: (1−ε)·that + ε·(the same with w and l swapped). `--loss` takes every loss TRL 1.16
offers (ipo, hinge, robust, ...); several are combined with `--loss-weights`.
`--precompute-ref-log-probs` computes the reference log-probs once before training (no reference forward per
step).

Tool-calling pairs (a `tools` column; chosen / rejected are conversations with assistant `tool_calls`, `tool`
messages and the final answer, as `align pairs --tool` writes them): TRL 1.16's DPOTrainer renders prompt + chosen
with the row's tools and takes every token after the prompt as the completion, so its log-probs would include the
rendered tool results (text the model never chose) and the headers around them. Here (`ModelTokenDPOTrainer`) the
log-probs of such rows cover the model's tokens only — each assistant turn and its end-of-turn token, the tokens
`align sft` trains on (align.data.chat) and grpo's `env_mask` keeps — for the policy and the reference alike.

Data: preference pairs (align.data.preference). Raises AlignError (exit 2) for config/data/parent problems,
all reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import Problems, unknown_name
from align.stages.common import (
    as_dataset,
    finish_stage,
    launch_or_join,
    load_train_eval,
    start_stage,
    trainer_arguments,
)
from align.stages.options import DataOptions, ModelOptions, TrainOptions

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    lr: float = opt(5e-5, "Peak learning rate.", range="(0, inf)")
    beta: float = opt(0.1, "β: strength of the implicit KL constraint to the reference (higher = stay closer).", range="(0, inf)")
    loss: list[str] = opt(factory=lambda: ["sigmoid"], help="DPO loss variant(s): " + ", ".join(DPO_LOSSES) + ".")
    loss_weights: list[float] | None = opt(None, "Weights when several --loss variants are combined.")
    label_smoothing: float = opt(0.0, "Label smoothing ε (conservative/robust DPO): assumed rate of flipped labels.", range="[0, 0.5)")
    precompute_ref_log_probs: bool = opt(False, "Compute the reference log-probs once before training.")

    def check(self, problems: Problems) -> None:
        for name in self.loss:
            if name not in DPO_LOSSES:
                problems.add("--loss: " + unknown_name("DPO loss", name, DPO_LOSSES))
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            problems.add(f"--loss-weights has {len(self.loss_weights)} values for {len(self.loss)} --loss variants.")
        if self.beta <= 0:
            problems.add(f"--beta must be positive, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            problems.add(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}.")


def load_preference_data(cfg):
    from align.data.preference import load_preferences

    def load(spec: str, split):
        return load_preferences(spec, split=split, columns=cfg.columns, system_prompt=cfg.system_prompt)

    return load_train_eval(cfg, load)


def model_token_masks(example: dict, tokenizer) -> dict:
    """For a tool-calling pair after TRL's tokenization: 1 on the chosen / rejected tokens of the model's own turns
    (align.data.chat.encode_example's assistant mask over the same rendering), 0 on tool results and the template's
    text between turns. All ones if the rendering does not reproduce TRL's tokens (nothing is masked then)."""
    import json

    from align.data.chat import encode_example

    tools = json.loads(example["tools"]) if isinstance(example["tools"], str) else example["tools"]
    out, prompt = {}, example["prompt_ids"]
    for side in ("chosen", "rejected"):
        enc = encode_example({"messages": example["prompt"] + example[side], "tools": tools}, tokenizer)
        ids = example[f"{side}_ids"]
        same = enc["input_ids"][: len(prompt) + len(ids)] == prompt + ids
        out[f"{side}_model_mask"] = enc["assistant_masks"][len(prompt) : len(prompt) + len(ids)] if same else [1] * len(ids)
    return out


def _model_token_trainer():
    """TRL's DPOTrainer, with tool-calling rows' log-probs over the model's tokens only (module docstring)."""
    from trl import DPOTrainer

    class ModelTokenDPOTrainer(DPOTrainer):
        MASKS = ("chosen_model_mask", "rejected_model_mask")

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._mask_collator()

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if "tools" not in dataset.column_names:
                return dataset
            return dataset.map(model_token_masks, fn_kwargs={"tokenizer": self._tokenizer},
                               desc=f"Masking tool results in {dataset_name} dataset")

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, *self.MASKS]

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._mask_collator()  # runs inside DPOTrainer.__init__, before ours returns
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _mask_collator(self):
            if not isinstance(self.data_collator, ModelTokenCollator):
                self.data_collator = ModelTokenCollator(self.data_collator)

    return ModelTokenDPOTrainer


class ModelTokenCollator:
    """Wraps TRL's DataCollatorForPreference: the completion mask times the rows' model-token masks (when given),
    cut and padded exactly as the collator cuts and pads the sequences."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        out = self.inner(examples)
        if "chosen_model_mask" not in examples[0]:
            return out
        masks = [[0] * len(e["prompt_ids"]) + list(e[f"{side}_model_mask"])
                 for side in ("chosen", "rejected") for e in examples]
        limit = getattr(self.inner, "max_length", None)
        if limit is not None:
            keep_end = getattr(self.inner, "truncation_mode", "keep_start") == "keep_end"
            masks = [m[-limit:] if keep_end else m[:limit] for m in masks]
        width = out["completion_mask"].shape[1]
        padded = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=out["completion_mask"].dtype)
        out["completion_mask"] = out["completion_mask"] * padded
        return out


def main(cfg: DPOConfig) -> Path:
    """Run DPO as configured; returns the run directory."""
    from trl import DPOConfig as TRLDPOConfig

    if (workers_run := launch_or_join(cfg, "dpo", load_preference_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    started = start_stage(cfg, "dpo", load_preference_data)
    args = TRLDPOConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None), max_length=cfg.max_length,
        beta=cfg.beta, loss_type=list(cfg.loss), loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
    )
    return finish_stage(
        started, cfg, stage="dpo", task="causal-lm", reference="parent policy (frozen)",
        make_trainer=lambda callbacks: _model_token_trainer()(
            model=started.policy.model, ref_model=None, args=args, processing_class=started.policy.tokenizer,
            train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
        ),
    )

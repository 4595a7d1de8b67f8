"""Options shared by the stages (model, data, training); each stage config is a dataclass composed of these
plus its own. The help text of every option lives here, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.config import RemoteCodeOption, opt
from align.errors import Problems
from align.io import output_path_problem
from align.models import check_model_path


@dataclass
class ModelOptions(RemoteCodeOption):
    model: str | None = opt(None, "Base model: a local from_pretrained directory or a hub id (not needed with --from).")
    from_run: str | None = opt(None, "Start from this finished run's policy (base + its adapter).", aliases=["--from"])
    handoff: Literal["continue", "merge"] = opt(
        "continue", "With --from: continue training the parent's adapter, or merge it into the base and train a "
                    "fresh adapter on top.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype: auto = float32 on CPU, bfloat16 on a GPU that supports it (--adapter full: float32 "
                "weights, computing in bf16); bfloat16/float16 train in that dtype throughout.")
    attn_implementation: str | None = opt(None, "Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice.")

    def check(self, problems: Problems) -> None:
        problem = check_model_path(self.model) if self.model or not self.from_run else None
        if problem:
            problems.add(problem + (" Or start from a run with --from RUN." if not self.model else ""))


@dataclass
class DataOptions:
    data: str | None = opt(None, "Training data: a .jsonl/.json/.csv/.parquet file, a save_to_disk directory, a "
                                 "bundled sample name (arith) or a hub dataset id.")
    eval_data: str | None = opt(None, "Held-out data for evaluation (same formats as --data).")
    eval_split: float = opt(0.0, "Fraction of --data held out for evaluation when --eval-data is not given (0 = none).", range="[0, 1)")
    split: str | None = opt(None, "Split of --data when it is a DatasetDict directory or a hub dataset (default: train).")
    eval_data_split: str | None = opt(
        None, "Split of --eval-data when it is a DatasetDict directory or a hub dataset (default: the first of test, "
              "validation, eval, dev it has).")
    columns: list[str] = opt(factory=list, help="Column renames NAME=COLUMN, e.g. --columns prompt=query completion=response.")
    system_prompt: str | None = opt(None, "System message added to conversations that have none.")
    max_length: int = opt(1024, "Maximum tokens per example; longer examples are truncated.", range="[1, inf)")

    def check(self, problems: Problems) -> None:
        if not self.data:
            problems.add("--data is required: a data file, a directory, a bundled sample name or a hub id.")
        if not 0 <= self.eval_split < 1:
            problems.add(f"--eval-split must be in [0, 1), got {self.eval_split}.")
        if self.max_length <= 0:
            problems.add(f"--max-length must be positive, got {self.max_length}.")


@dataclass
class TrainOptions:
    output: str | None = opt(None, "Run directory to write (run.json, adapter/ or model/, metrics.jsonl, checkpoints/).", aliases=["-o"])
    max_steps: int = opt(-1, "Total optimizer steps; -1 = train for --epochs.")
    epochs: float = opt(1.0, "Passes over the training data (ignored when --max-steps > 0).", range="(0, inf)")
    lr: float = opt(2e-4, "Peak learning rate.", range="(0, inf)")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule (linear, cosine, constant, constant_with_warmup, ...).")
    warmup: float = opt(0.0, "Warmup: a fraction of total steps if < 1, else a number of steps.", range="[0, inf)")
    weight_decay: float = opt(0.0, "AdamW weight decay.", range="[0, inf)")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).", range="[0, inf)")
    batch_size: int = opt(8, "Examples per device per step.", range="[1, inf)")
    grad_accum: int = opt(1, "Gradient accumulation steps.", range="[1, inf)")
    eval_batch_size: int | None = opt(None, "Examples per device per evaluation step (default: --batch-size).", range="[1, inf)")
    logging_steps: int = opt(10, "Log metrics every N steps.", range="[1, inf)")
    eval_steps: int | None = opt(None, "Evaluate every N steps (default: --logging-steps when there is eval data).", range="[1, inf)")
    save_steps: int = opt(200, "Write a resumable checkpoint every N steps.", range="[1, inf)")
    save_total_limit: int | None = opt(2, "Keep the newest N checkpoints in RUN/checkpoints (older ones are deleted); "
                                          "0 or none keeps all.", range="[0, inf)")
    keep_best: str | None = opt(None, "Keep the policy of the evaluation step with the best held-out METRIC[:max|min] "
                                      "(e.g. eval/gold/accuracy/mean, eval_loss:min) as the run's adapter; run.json "
                                      "names the step. Saved apart from checkpoints (--save-total-limit never "
                                      "deletes it); needs held-out data.")
    seed: int = opt(42, "Random seed (data order, initialisation).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    resume: bool = opt(False, "Continue the run in --output from its last checkpoint.")
    overwrite: bool = opt(False, "Replace an existing run in --output.")
    strict: bool = opt(False, "Fail the run (exit 2) when training was degenerate: a reward None or constant all run, "
                              "every GRPO group without reward variance, chosen == rejected pairs, the loss flat with "
                              "grad norm 0 (run.json 'health'; default in pipelines). NaN/exploded weights always fail.")
    tensorboard: bool = opt(True, "Write TensorBoard logs to RUN/logs (when --report-to includes tensorboard).")
    report_to: list[str] = opt(factory=lambda: ["tensorboard"], help="Trackers for the metrics: tensorboard, wandb, "
                               "trackio, mlflow (several allowed), or none. Every value is also in metrics.jsonl.")
    num_processes: int | None = opt(None, "Train in N processes launched through accelerate (data parallel: one step's "
                                          "global batch is --batch-size × N × --grad-accum). Default: 1, or as many as "
                                          "`accelerate launch` started. See docs/DISTRIBUTED.md.", range="[1, inf)")
    accelerate_config: str | None = opt(None, "accelerate config for the launch: a preset (ddp; for GPUs also zero2, "
                                              "zero3 = DeepSpeed, fsdp2) or an accelerate config YAML file.")

    def check(self, problems: Problems) -> None:
        if not self.output:
            problems.add("--output is required: the run directory to write.")
        elif (problem := output_path_problem(self.output)) is not None:  # a file, a dangling link, under a file
            problems.add(problem)
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if self.save_total_limit is not None and self.save_total_limit < 0:
            problems.add(f"--save-total-limit must be >= 0 (0 keeps every checkpoint), got {self.save_total_limit}.")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.add(f"--max-steps must be positive or -1, got {self.max_steps}.")
        if self.max_steps == -1 and self.epochs <= 0:
            problems.add(f"--epochs must be positive, got {self.epochs}.")
        if self.lr <= 0:
            problems.add(f"--lr must be positive, got {self.lr}.")
        from transformers import SchedulerType

        from align.errors import unknown_name
        from align.trackers import check_report_to

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            problems.add("--lr-scheduler: " + unknown_name("schedule", self.lr_scheduler, schedulers))

        check_report_to(self.report_to, problems)
        from align.launch import check_options

        check_options(self.num_processes, self.accelerate_config, problems)
        from align.stages.best import check as check_keep_best

        check_keep_best(self.keep_best, self, problems, known=getattr(self, "held_out_names", lambda: None)())
        from align.launch import sharded_launch

        if self.keep_best and sharded_launch(self.accelerate_config):
            problems.add(f"--keep-best saves the policy from the main process; with {sharded_launch(self.accelerate_config)} "
                         "the weights are sharded. Use --accelerate-config ddp, or drop --keep-best.")
        if self.resume and self.overwrite:
            problems.add("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it.")

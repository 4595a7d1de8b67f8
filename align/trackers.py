"""Experiment trackers: `--report-to tensorboard wandb trackio mlflow | none`.

Every stage logs through `Trackers` below — the TRL stages (sft, rm, dpo, grpo) through its `callback()` on the
Trainer's logs, ppo's own loop directly — so every tracker sees the same scalar names at the same steps whatever the
stage: a metrics.jsonl key `k` becomes `train/k`, an evaluation key `eval_k` (TRL) or `eval/k` (ppo) becomes `eval/k`
(transformers' own convention, `rewrite_logs`); the step is the optimizer step. TensorBoard (the default) writes
RUN/logs. wandb, trackio and mlflow are optional installs (`pip install -e ".[trackers]"`): asking for one that is
missing is a config error, reported before any model loads. Each reads its usual environment (WANDB_PROJECT /
WANDB_MODE=offline, TRACKIO_PROJECT / TRACKIO_DIR, MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME); the project name
defaults to `align` (ALIGN_PROJECT) and the run name to the run directory's name.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from align.errors import Problems

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
EXTERNAL = ("wandb", "trackio", "mlflow")

logger = logging.getLogger(__name__)


def check_report_to(values: list[str], problems: Problems) -> None:
    for name in values:
        if name not in (*TRACKERS, "none"):
            problems.add(f"--report-to {name}: unknown tracker. Choose from {', '.join(TRACKERS)} or none.")
        elif name in EXTERNAL and importlib.util.find_spec(name) is None:
            problems.add(f"--report-to {name}: the '{name}' package is not installed (pip install {name}).")
    if "none" in values and len(values) > 1:
        problems.add(f"--report-to none excludes the other trackers, got {' '.join(values)}.")


def tracker_key(key: str) -> str:
    """The name a metrics.jsonl key has in every tracker (see the module docstring)."""
    if key.startswith("eval/"):
        return key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


NOT_SCALARS = ("step", "epoch")


class Trackers:
    """The trackers named in `report_to` (TensorBoard in RUN/logs when `tensorboard`), opened on the main process."""

    def __init__(self, report_to: list[str], run_name: str, run_dir: str, config: dict[str, Any], *,
                 tensorboard: bool = True):
        self.names = [v for v in report_to if v in EXTERNAL]
        self.writer = None
        if tensorboard and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed; no TensorBoard logs (pip install tensorboard).")
            else:
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "logs"))
        project = os.environ.get("ALIGN_PROJECT", "align")
        if "wandb" in self.names:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=run_dir,
                                    config=config, reinit="create_new")
        if "trackio" in self.names:
            import trackio

            self.trackio = trackio.init(project=os.environ.get("TRACKIO_PROJECT", project), name=run_name,
                                        config=config)
        if "mlflow" in self.names:
            import mlflow

            self.mlflow = mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics: dict[str, Any], step: int) -> None:
        scalars = {tracker_key(k): float(v) for k, v in metrics.items()
                   if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if "wandb" in self.names:
            self.wandb.log(scalars, step=step)
        if "trackio" in self.names:
            self.trackio.log(scalars, step=step)
        if "mlflow" in self.names:
            import mlflow

            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in scalars.items()}, step=step,
                               run_id=self.mlflow.info.run_id)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if "wandb" in self.names:
            self.wandb.finish()
        if "trackio" in self.names:
            self.trackio.finish()
        if "mlflow" in self.names:
            import mlflow

            mlflow.end_run()
        self.names = []

    def callback(self):
        """A transformers TrainerCallback that logs the Trainer's logs here (the stage closes the trackers)."""
        from transformers import TrainerCallback

        trackers = self

        class TrackerCallback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    trackers.log(logs, state.global_step)

        return TrackerCallback()

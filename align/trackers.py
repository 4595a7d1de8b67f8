"""Experiment trackers: `--report-to tensorboard wandb trackio mlflow | none`.

TRL's trainers (sft, rm, dpo, grpo) get the names through `TrainingArguments.report_to` (transformers' own
integrations); TensorBoard is align's writer on RUN/logs (the default). align's own loop (ppo) logs through
`Trackers` below, with the same names and the same metric keys as metrics.jsonl. wandb, trackio and mlflow are
optional installs: asking for one that is missing is a config error, reported before any model loads. Each reads
its usual environment (WANDB_PROJECT / WANDB_MODE, TRACKIO_PROJECT, MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from align.errors import Problems

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
EXTERNAL = ("wandb", "trackio", "mlflow")


def check_report_to(values: list[str], problems: Problems) -> None:
    for name in values:
        if name not in (*TRACKERS, "none"):
            problems.add(f"--report-to {name}: unknown tracker. Choose from {', '.join(TRACKERS)} or none.")
        elif name in EXTERNAL and importlib.util.find_spec(name) is None:
            problems.add(f"--report-to {name}: the '{name}' package is not installed (pip install {name}).")
    if "none" in values and len(values) > 1:
        problems.add(f"--report-to none excludes the other trackers, got {' '.join(values)}.")


def trainer_report_to(values: list[str]) -> list[str] | str:
    """The `report_to` for a transformers/TRL trainer: the external trackers (TensorBoard is align's own writer)."""
    return [v for v in values if v in EXTERNAL] or "none"


class Trackers:
    """Log a loop's metrics to the external trackers named in `report_to` (ppo's own loop)."""

    def __init__(self, report_to: list[str], run_name: str, run_dir: str, config: dict[str, Any]):
        self.names = [v for v in report_to if v in EXTERNAL]
        project = os.environ.get("ALIGN_PROJECT", "align")
        if "wandb" in self.names:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=run_dir,
                                    config=config, reinit=True)
        if "trackio" in self.names:
            import trackio

            trackio.init(project=os.environ.get("TRACKIO_PROJECT", project), name=run_name, config=config)
        if "mlflow" in self.names:
            import mlflow

            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "wandb" in self.names:
            self.wandb.log(metrics, step=step)
        if "trackio" in self.names:
            import trackio

            trackio.log(metrics, step=step)
        if "mlflow" in self.names:
            import mlflow

            mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if "wandb" in self.names:
            self.wandb.finish()
        if "trackio" in self.names:
            import trackio

            trackio.finish()
        if "mlflow" in self.names:
            import mlflow

            mlflow.end_run()

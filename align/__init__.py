"""align: a staged post-training toolkit (SFT -> RM/DPO/KTO/ORPO/SimPO -> PPO/GRPO) with PEFT adapters.

Python API: each stage takes the same options as its command (snake_case) and returns the run directory.

    import align
    run = align.sft(model="runs/tiny", data="arith", output="runs/sft", adapter="lora", max_steps=100)
    align.dpo(from_run=run, data="arith-prefs", output="runs/dpo", beta=0.1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def _quiet_known_noise() -> None:
    """bitsandbytes on CPU warns on import that it cannot fetch an optional kernel from a model hub (the `kernels`
    package, which align must not install: it downloads). The fallback it uses is correct; drop that one line."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


_quiet_known_noise()


def _scoped(fn, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` holding the output locks it takes only until it returns (align.integrity.writer_scope)."""
    from align.integrity import writer_scope

    with writer_scope():
        return fn(*args, **kwargs)


def sft(**options: Any) -> Path:
    """Supervised fine-tuning; options as `align sft --help` (e.g. model, data, output, adapter, lr)."""
    from align.stages.sft import SFTConfig, main

    return _scoped(main, SFTConfig.from_kwargs(**options))


def rm(**options: Any) -> Path:
    """Reward-model training; options as `align rm --help`."""
    from align.stages.rm import RMConfig, main

    return _scoped(main, RMConfig.from_kwargs(**options))


def dpo(**options: Any) -> Path:
    """DPO from a base (model=...) or a run (from_run=... or **{"from": ...}); options as `align dpo --help`."""
    from align.stages.dpo import DPOConfig, main

    return _scoped(main, DPOConfig.from_kwargs(**options))


def kto(**options: Any) -> Path:
    """KTO on unpaired feedback from a base (model=...) or a run (from_run=...); options as `align kto --help`."""
    from align.stages.kto import KTOConfig, main

    return _scoped(main, KTOConfig.from_kwargs(**options))


def orpo(**options: Any) -> Path:
    """ORPO (reference-free) on preference pairs from a base or a run; options as `align orpo --help`."""
    from align.stages.orpo import ORPOConfig, main

    return _scoped(main, ORPOConfig.from_kwargs(**options))


def simpo(**options: Any) -> Path:
    """SimPO (reference-free) on preference pairs from a base or a run; options as `align simpo --help`."""
    from align.stages.simpo import SimPOConfig, main

    return _scoped(main, SimPOConfig.from_kwargs(**options))


def grpo(**options: Any) -> Path:
    """GRPO with reward functions (reward=[...]) from a base or a run; options as `align grpo --help`."""
    from align.stages.grpo import GRPOConfig, main

    return _scoped(main, GRPOConfig.from_kwargs(**options))


def ppo(**options: Any) -> Path:
    """PPO from a policy run (from_run=...) with reward_model=RM_RUN and/or reward=[...]; options as `align ppo --help`."""
    from align.stages.ppo import PPOConfig, main

    return _scoped(main, PPOConfig.from_kwargs(**options))


def pairs(**options: Any) -> Path:
    """On-policy preference pairs from a run (from_run=...) scored by reward=[...]; options as `align pairs --help`."""
    from align.stages.pairs import PairsConfig, main

    return _scoped(main, PairsConfig.from_kwargs(**options))


def distill(**options: Any) -> Path:
    """On-policy distillation of a student (model=... or from_run=...) by teacher=RUN|MODEL; options as `align distill --help`."""
    from align.stages.distill import DistillConfig, main

    return _scoped(main, DistillConfig.from_kwargs(**options))


def evaluate(target: str | Path, **options: Any) -> dict[str, Any]:
    """Held-out metrics of a run or model (data=..., reward=[...], ...); options as `align eval --help`."""
    from align.evaluation import EvalConfig, evaluate

    cfg = EvalConfig.from_kwargs(target=str(target), **options)
    cfg.validate()
    return evaluate(cfg)


def run(pipeline: str | Path | dict[str, Any], *, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Run a pipeline (a YAML file or the same mapping); returns DIR/pipeline.json's content. See `align run --help`."""
    from align.pipeline import run_pipeline

    return _scoped(run_pipeline, pipeline, dry_run=dry_run, force=force)


__all__ = ["__version__", "distill", "dpo", "evaluate", "grpo", "kto", "orpo", "pairs", "ppo", "rm", "run", "sft",
           "simpo"]

"""Training stages. Each module: a config dataclass, the training logic, and `main(cfg)`. Stages never import
the CLI; shared options live in `options`, the shared trainer lifecycle in `common`.

`KINDS` is the one table of stage kinds (the CLI's stage commands and `align run`'s `kind:` both read it):
kind -> (module, config class, data loader).
"""

from __future__ import annotations

import importlib
from typing import Any

KINDS: dict[str, tuple[str, str, str]] = {
    "sft": ("align.stages.sft", "SFTConfig", "load_sft_data"),
    "rm": ("align.stages.rm", "RMConfig", "load_rm_data"),
    "dpo": ("align.stages.dpo", "DPOConfig", "load_preference_data"),
    "kto": ("align.stages.kto", "KTOConfig", "load_unpaired_data"),
    "orpo": ("align.stages.orpo", "ORPOConfig", "load_reference_free_data"),
    "simpo": ("align.stages.simpo", "SimPOConfig", "load_reference_free_data"),
    "grpo": ("align.stages.grpo", "GRPOConfig", "load_prompt_data"),
    "ppo": ("align.stages.ppo", "PPOConfig", "load_prompt_data"),
    "pairs": ("align.stages.pairs", "PairsConfig", "load_prompt_data"),
    "distill": ("align.stages.distill", "DistillConfig", "load_prompt_data"),
}
POLICY_KINDS = ("sft", "dpo", "kto", "orpo", "simpo", "grpo", "ppo", "distill")  # stages whose run is a policy (a causal LM a child can start from)


def stage_parts(kind: str) -> tuple[Any, Any, Any]:
    """(config class, main, data loader) of a stage kind."""
    module_name, config, loader = KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config), module.main, getattr(module, loader)

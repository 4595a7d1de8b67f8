"""One registry of adapter kinds: each maps to a PEFT config, to one of align's own adapters, or to full fine-tuning.

    kind        method                                       options used
    lora        LoraConfig                                   lora_r, lora_alpha, lora_dropout, target_modules
    qlora       LoRA on a 4-bit nf4 double-quant base        same as lora
    dora        LoraConfig(use_dora=True)                    same as lora
    rslora      LoraConfig(use_rslora=True): α/√r scaling    same as lora
    loraplus    LoRA trained with LoRA+ (B's lr = ratio×A's)  same as lora, loraplus_lr_ratio (PEFT's
                                                             create_loraplus_optimizer); saved as plain LoRA
    adalora     AdaLoraConfig (SVD form, rank budget)        lora_r (initial rank), adalora_target_r, adalora_tinit,
                                                             adalora_tfinal; total_step = --max-steps (required)
    oft         OFTConfig (orthogonal, block-diagonal)       oft_block_size, lora_dropout, target_modules
    boft        BOFTConfig (butterfly orthogonal)            boft_block_size, boft_butterfly_factor, target_modules
    ia3         IA3Config                                    target_modules (default: PEFT's per-model choice)
    loha        LoHaConfig                                   lora_r, lora_alpha, lora_dropout, target_modules
    lokr        LoKrConfig                                   lora_r, lora_alpha, lora_dropout, target_modules
    vera        VeraConfig                                   lora_r, lora_dropout, target_modules
    prompt      PromptTuningConfig                           num_virtual_tokens, prompt_init_text (random if unset)
    prefix      PrefixTuningConfig                           num_virtual_tokens, prefix_projection (P-tuning v2 MLP),
                                                             encoder_hidden_size
    ptuning     PromptEncoderConfig (P-tuning)               num_virtual_tokens, encoder_type (mlp|lstm),
                                                             encoder_hidden_size
    bitfit      align.native_adapters: bias terms only       target_modules (zero biases added where none exist)
    bottleneck  align.native_adapters: Houlsby adapters      bottleneck_reduction, target_modules
    full        no adapter: every weight is trained          full_optimizer (adamw, or LOMO / AdaLOMO: lomo-optim)

Weight kinds (lora ... vera, bitfit, bottleneck) start as the identity (the adapted model equals the model it is
attached to), so a child stage starts exactly at its parent. PEFT weight kinds merge into the base (`align merge`,
`--handoff merge`); bitfit and bottleneck are merged in memory for `--handoff merge` but a plain transformers
directory cannot hold them (bitfit's added biases, bottleneck modules). Prompt-learning kinds (prompt, prefix,
ptuning) add virtual tokens: no identity initialisation, no merge. A continued prompt-learning adapter trains its
saved virtual-token embeddings directly (the MLP/LSTM reparameterisation is a training-time device PEFT does not
save).

`STAGE_LIMITS` lists the kind × stage combinations that cannot work, with the reason; they are refused at
validation (exit 2) by align.handoff.check_adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from align.config import opt
from align.errors import Problems, unknown_name


@dataclass
class AdapterOptions:
    adapter: str | None = opt(None, "Adapter kind: lora, qlora, dora, rslora, loraplus, adalora, oft, boft, ia3, loha, "
                                    "lokr, vera, prompt, prefix, ptuning, bitfit, bottleneck, full (see docs/ADAPTERS.md). "
                                    "Default: lora, or the parent's kind with --from.")
    lora_r: int = opt(16, "Rank of LoRA-family adapters (lora, qlora, dora, rslora, loraplus, loha, lokr, vera); "
                          "adalora's initial rank.", range="[1, inf)")
    lora_alpha: int = opt(32, "Scaling alpha of LoRA-family adapters.", range="(0, inf)")
    lora_dropout: float = opt(0.05, "Dropout on the adapter input (LoRA family, oft, boft).", range="[0, 1)")
    target_modules: list[str] = opt(
        factory=lambda: ["all-linear"],
        help="Modules to adapt (names or 'all-linear'). For ia3, 'all-linear' means PEFT's default for the model; for "
             "bitfit every linear layer; for bottleneck the attention and feed-forward output layers.",
    )
    loraplus_lr_ratio: float = opt(16.0, "loraplus: learning rate of the B matrices = this × --lr (the A matrices' "
                                         "rate); LoRA+ recommends 16 and a --lr about half of plain LoRA's.", range="[1, inf)")
    adalora_target_r: int = opt(8, "adalora: average rank the budget is pruned to (initial rank: --lora-r).", range="[1, inf)")
    adalora_tinit: int = opt(0, "adalora: steps of warm-up before ranks are pruned.", range="[0, inf)")
    adalora_tfinal: int = opt(0, "adalora: last steps trained with the final ranks fixed (total = --max-steps).", range="[0, inf)")
    oft_block_size: int = opt(32, "oft: size of the orthogonal blocks (must divide the adapted layers' input size).", range="[1, inf)")
    boft_block_size: int = opt(4, "boft: size of the butterfly blocks (must divide the adapted layers' input size).", range="[1, inf)")
    boft_butterfly_factor: int = opt(1, "boft: number of butterfly factors (1 = block-diagonal, like oft).", range="[1, inf)")
    bottleneck_reduction: int = opt(16, "bottleneck: the adapter's hidden size is the layer width / this.", range="[1, inf)")
    full_optimizer: Literal["adamw", "lomo", "adalomo"] = opt(
        "adamw", "full: optimizer. lomo / adalomo fuse the update into backward, so no gradients or Adam states are "
                 "kept (full fine-tuning in the memory of inference + activations; pip install lomo-optim).")
    num_virtual_tokens: int = opt(8, "Virtual tokens of prompt-learning adapters (prompt, prefix, ptuning).", range="[1, inf)")
    prompt_init_text: str | None = opt(None, "prompt adapter: initialise the virtual tokens from this text (random if unset).")
    encoder_type: Literal["mlp", "lstm"] = opt("mlp", "ptuning adapter: prompt encoder, mlp or lstm.")
    encoder_hidden_size: int = opt(128, "ptuning/prefix adapter: hidden size of the prompt encoder / projection.", range="[1, inf)")
    prefix_projection: bool = opt(False, "prefix adapter: reparameterise the prefix through an MLP (P-tuning v2 "
                                         "style); without it the key/value prefixes are trained directly.")

    def check(self, problems: Problems) -> None:
        if self.adapter is not None and self.adapter not in ADAPTERS:
            problems.add("--adapter: " + unknown_name("adapter kind", self.adapter, ADAPTERS))
        for name in ("lora_r", "lora_alpha", "num_virtual_tokens", "encoder_hidden_size", "adalora_target_r",
                     "oft_block_size", "boft_block_size", "boft_butterfly_factor", "bottleneck_reduction"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if not 0 <= self.lora_dropout < 1:
            problems.add(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.loraplus_lr_ratio < 1:
            problems.add(f"--loraplus-lr-ratio must be >= 1 (B learns faster than A), got {self.loraplus_lr_ratio}.")
        if self.adalora_tinit < 0 or self.adalora_tfinal < 0:
            problems.add("--adalora-tinit and --adalora-tfinal must be >= 0.")


@dataclass(frozen=True)
class AdapterKind:
    name: str
    build: Callable[[AdapterOptions, str, str], Any] | None  # (options, task_type, model_path) -> config; None = full
    quantize_4bit: bool = False
    prompt_learning: bool = False
    native: bool = False  # align.native_adapters (not PEFT)

    @property
    def full(self) -> bool:
        return self.build is None

    @property
    def mergeable(self) -> bool:
        """Can be merged into the base (in memory for native kinds; see native_adapters.merge_problem)."""
        return not self.full and not self.prompt_learning


def _targets(opts: AdapterOptions) -> str | list[str]:
    return "all-linear" if opts.target_modules == ["all-linear"] else list(opts.target_modules)


def _lora(**extra: Any):
    def build(opts: AdapterOptions, task_type: str, model_path: str):
        from peft import LoraConfig

        return LoraConfig(
            r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
            target_modules=_targets(opts), task_type=task_type, **extra,
        )

    return build


def _adalora(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=opts.lora_r, target_r=opts.adalora_target_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
        target_modules=_targets(opts), task_type=task_type, total_step=max(1, getattr(opts, "max_steps", 1)),
        tinit=opts.adalora_tinit, tfinal=opts.adalora_tfinal,
    )


def _oft(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=opts.oft_block_size, module_dropout=opts.lora_dropout,
                     target_modules=_targets(opts), task_type=task_type)


def _boft(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=opts.boft_block_size, boft_n_butterfly_factor=opts.boft_butterfly_factor,
                      boft_dropout=opts.lora_dropout, target_modules=_targets(opts), task_type=task_type)


def _native(kind: str):
    def build(opts: AdapterOptions, task_type: str, model_path: str):
        from align.native_adapters import NativeConfig

        targets = None if opts.target_modules == ["all-linear"] else list(opts.target_modules)
        return NativeConfig(kind, targets=targets, reduction=opts.bottleneck_reduction, task_type=task_type,
                            base_model_name_or_path=model_path)

    return build


def _loha(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import LoHaConfig

    return LoHaConfig(r=opts.lora_r, alpha=opts.lora_alpha, module_dropout=opts.lora_dropout,
                      target_modules=_targets(opts), task_type=task_type)


def _lokr(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import LoKrConfig

    return LoKrConfig(r=opts.lora_r, alpha=opts.lora_alpha, module_dropout=opts.lora_dropout,
                      target_modules=_targets(opts), task_type=task_type)


def _vera(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import VeraConfig

    return VeraConfig(r=opts.lora_r, vera_dropout=opts.lora_dropout, target_modules=_targets(opts), task_type=task_type)


def _ia3(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import IA3Config

    if opts.target_modules == ["all-linear"]:
        return IA3Config(task_type=task_type)  # PEFT's per-architecture attention + feed-forward choice
    return IA3Config(target_modules=list(opts.target_modules), feedforward_modules=[], task_type=task_type)


def _prompt(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import PromptTuningConfig, PromptTuningInit

    if opts.prompt_init_text:
        return PromptTuningConfig(
            num_virtual_tokens=opts.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=opts.prompt_init_text, tokenizer_name_or_path=model_path, task_type=task_type,
        )
    return PromptTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, task_type=task_type)


def _prefix(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=opts.num_virtual_tokens, prefix_projection=opts.prefix_projection,
                              encoder_hidden_size=opts.encoder_hidden_size, task_type=task_type)


def _ptuning(opts: AdapterOptions, task_type: str, model_path: str):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        num_virtual_tokens=opts.num_virtual_tokens, encoder_reparameterization_type=opts.encoder_type.upper(),
        encoder_hidden_size=opts.encoder_hidden_size, task_type=task_type,
    )


ADAPTERS: dict[str, AdapterKind] = {
    k.name: k
    for k in [
        AdapterKind("lora", _lora()),
        AdapterKind("qlora", _lora(), quantize_4bit=True),
        AdapterKind("dora", _lora(use_dora=True)),
        AdapterKind("rslora", _lora(use_rslora=True)),
        AdapterKind("loraplus", _lora()),
        AdapterKind("adalora", _adalora),
        AdapterKind("oft", _oft),
        AdapterKind("boft", _boft),
        AdapterKind("ia3", _ia3),
        AdapterKind("loha", _loha),
        AdapterKind("lokr", _lokr),
        AdapterKind("vera", _vera),
        AdapterKind("prompt", _prompt, prompt_learning=True),
        AdapterKind("prefix", _prefix, prompt_learning=True),
        AdapterKind("ptuning", _ptuning, prompt_learning=True),
        AdapterKind("bitfit", _native("bitfit"), native=True),
        AdapterKind("bottleneck", _native("bottleneck"), native=True),
        AdapterKind("full", None),
    ]
}

_PPO_LOOP = "align ppo's own loop "
# (kind, stage) -> why that kind cannot train in that stage; refused at validation (align.handoff.check_adapter)
STAGE_LIMITS: dict[tuple[str, str], str] = {
    **{(k, "ppo"): "ppo keeps actor, frozen reference and critic as adapters of one PEFT model; a full fine-tuning "
                   "or prompt-learning policy cannot hold them" for k in ("full", "prompt", "prefix", "ptuning")},
    **{(k, "ppo"): "ppo keeps actor, frozen reference and critic as PEFT adapters of one model, and bitfit / "
                   "bottleneck are not PEFT adapters" for k in ("bitfit", "bottleneck")},
    ("loraplus", "ppo"): _PPO_LOOP + "builds a plain AdamW optimizer, so the LoRA+ learning-rate ratio would be "
                                     "ignored; use lora, or loraplus in sft/dpo/grpo",
    ("adalora", "ppo"): _PPO_LOOP + "does not run AdaLoRA's rank allocation (update_and_allocate) after each step",
    **{(k, stage): f"it prepends virtual tokens to the logits, and TRL's experimental {trainer} compares them with "
                   "labels of the text alone (a shape error); use prefix, or a weight adapter such as lora"
       for k in ("prompt", "ptuning") for stage, trainer in (("orpo", "ORPOTrainer"), ("simpo", "CPOTrainer"))},
    **{(k, "distill"): "TRL's distillation loss runs the model's backbone directly, so the virtual tokens would be "
                       "skipped; use a weight adapter (lora, ...) or full" for k in ("prompt", "prefix", "ptuning")},
}


def stage_limit(kind: str, stage: str) -> str | None:
    """Why `kind` cannot train in `stage`, or None."""
    return STAGE_LIMITS.get((kind, stage))


def adapter_kind(name: str) -> AdapterKind:
    return ADAPTERS[name]


def peft_config(opts: AdapterOptions, task_type: str, model_path: str):
    """The PEFT config (a NativeConfig for bitfit/bottleneck) for `opts.adapter`, or None for full fine-tuning."""
    kind = ADAPTERS[opts.adapter]
    return None if kind.full else kind.build(opts, task_type, model_path)


def adapter_options_dict(opts: Any) -> dict[str, Any]:
    """The adapter fields of any config that includes AdapterOptions (for the run manifest)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(AdapterOptions)}


def make_optimizer(kind: str, model, cfg):
    """The optimizer `kind` needs instead of the trainer's default (LoRA+'s two learning rates), or None."""
    if kind != "loraplus":
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                     weight_decay=cfg.weight_decay)

"""One registry of adapter kinds, each mapped to a PEFT config (or to full fine-tuning).

    kind      PEFT method                               options used
    lora      LoraConfig                                lora_r, lora_alpha, lora_dropout, target_modules
    qlora     LoRA on a 4-bit nf4 double-quant base     same as lora
    dora      LoraConfig(use_dora=True)                 same as lora
    rslora    LoraConfig(use_rslora=True)               same as lora
    loha      LoHaConfig                                lora_r, lora_alpha, lora_dropout, target_modules
    lokr      LoKrConfig                                lora_r, lora_alpha, lora_dropout, target_modules
    vera      VeraConfig                                lora_r, lora_dropout, target_modules
    ia3       IA3Config                                 target_modules (default: PEFT's per-model choice)
    prompt    PromptTuningConfig                        num_virtual_tokens, prompt_init_text (random if unset)
    prefix    PrefixTuningConfig                        num_virtual_tokens, prefix_projection, encoder_hidden_size
    ptuning   PromptEncoderConfig (P-tuning)            num_virtual_tokens, encoder_type (mlp|lstm), encoder_hidden_size
    full      no adapter: every weight is trained       -

Weight-based kinds (lora ... ia3) start as the identity (the adapted model equals the base), can be merged
into the base, and are the ones a later stage can continue from exactly. Prompt-learning kinds (prompt,
prefix, ptuning) add virtual tokens: they have no identity initialisation and cannot be merged.
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
    adapter: str | None = opt(None, "Adapter kind: lora, qlora, dora, rslora, loha, lokr, vera, ia3, prompt, prefix, "
                                    "ptuning, full. Default: lora, or the parent's kind with --from.")
    lora_r: int = opt(16, "Rank of LoRA-family adapters (lora, qlora, dora, rslora, loha, lokr, vera).")
    lora_alpha: int = opt(32, "Scaling alpha of LoRA-family adapters.")
    lora_dropout: float = opt(0.05, "Dropout on the adapter input (LoRA family).")
    target_modules: list[str] = opt(
        factory=lambda: ["all-linear"],
        help="Modules to adapt (names or 'all-linear'). For ia3, 'all-linear' means PEFT's default for the model.",
    )
    num_virtual_tokens: int = opt(8, "Virtual tokens of prompt-learning adapters (prompt, prefix, ptuning).")
    prompt_init_text: str | None = opt(None, "prompt adapter: initialise the virtual tokens from this text (random if unset).")
    encoder_type: Literal["mlp", "lstm"] = opt("mlp", "ptuning adapter: prompt encoder, mlp or lstm.")
    encoder_hidden_size: int = opt(128, "ptuning/prefix adapter: hidden size of the prompt encoder / projection.")
    prefix_projection: bool = opt(False, "prefix adapter: reparameterise the prefix through an MLP.")

    def check(self, problems: Problems) -> None:
        if self.adapter is not None and self.adapter not in ADAPTERS:
            problems.add("--adapter: " + unknown_name("adapter kind", self.adapter, ADAPTERS))
        for name in ("lora_r", "lora_alpha", "num_virtual_tokens", "encoder_hidden_size"):
            if getattr(self, name) <= 0:
                problems.add(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
        if not 0 <= self.lora_dropout < 1:
            problems.add(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass(frozen=True)
class AdapterKind:
    name: str
    build: Callable[[AdapterOptions, str, str], Any] | None  # (options, task_type, model_path) -> PeftConfig
    quantize_4bit: bool = False
    prompt_learning: bool = False

    @property
    def full(self) -> bool:
        return self.build is None

    @property
    def mergeable(self) -> bool:
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
        AdapterKind("loha", _loha),
        AdapterKind("lokr", _lokr),
        AdapterKind("vera", _vera),
        AdapterKind("ia3", _ia3),
        AdapterKind("prompt", _prompt, prompt_learning=True),
        AdapterKind("prefix", _prefix, prompt_learning=True),
        AdapterKind("ptuning", _ptuning, prompt_learning=True),
        AdapterKind("full", None),
    ]
}


def adapter_kind(name: str) -> AdapterKind:
    return ADAPTERS[name]


def peft_config(opts: AdapterOptions, task_type: str, model_path: str):
    """The PEFT config for `opts.adapter`, or None for full fine-tuning."""
    kind = ADAPTERS[opts.adapter]
    return None if kind.full else kind.build(opts, task_type, model_path)


def adapter_options_dict(opts: Any) -> dict[str, Any]:
    """The adapter fields of any config that includes AdapterOptions (for the run manifest)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(AdapterOptions)}

"""Adapters that PEFT does not have, implemented here: `bitfit` and `bottleneck`.

- bitfit (Ben Zaken et al. 2021): only bias terms train. Every linear layer of the backbone (or the
  `--target-modules` named ones) gets a bias; where the architecture has none (Llama, Qwen's MLP and attention
  output, ...) a zero bias is added, so the model starts exactly as the base. Norm biases (BERT's LayerNorm) train too.
- bottleneck (Houlsby et al. 2019): on the output of every attention block and every feed-forward block (before
  the residual addition), h ← h + up(GELU(down(h))), with down: d → d/`--bottleneck-reduction` and `up`
  initialised to zero, so the model starts as the identity. Default targets: the modules named self_attn and mlp
  (Llama, Qwen, Mistral, ...) or attention.output.dense and output.dense (BERT); `--target-modules` names others.
  The adapter runs as a forward hook on its block, so the base weights keep their names, and a PEFT adapter trained
  later on top (`--handoff merge`) neither wraps the bottleneck's own layers nor changes when it is merged.

A reward model (sequence classification) also trains its score head, saved with the adapter (as PEFT does).

Saved directory: `align_adapter.json` (kind, settings, which layers got a new bias or a bottleneck, the base
model) + `adapter.safetensors` (only the trained tensors) + the tokenizer. `--from`, `align generate`, `align eval`
load it through align.handoff; `align merge` writes a plain model only for a bitfit adapter that added no bias
(a plain transformers directory cannot hold extra biases or bottleneck modules).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError

CONFIG_NAME = "align_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
HEADS = ("lm_head", "score", "classifier", "pooler", "cls")
BOTTLENECK_TARGETS = ("self_attn", "mlp", "attention.output.dense", "output.dense")
EXCLUDE_FROM_PEFT = r".*\.align_bottleneck\..*"


@dataclass
class NativeConfig:
    """What a native adapter is and where it sits (the JSON file of its saved directory)."""

    kind: str                                   # bitfit | bottleneck
    targets: list[str] | None = None            # module name suffixes; None = the kind's default
    reduction: int = 16                         # bottleneck: d -> d / reduction
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    added_biases: list[str] = field(default_factory=list)   # bitfit: layers that had no bias
    modules: list[str] = field(default_factory=list)        # bottleneck: layers that carry one

    def to_json(self) -> str:
        return json.dumps({"format": "align-native-adapter", **asdict(self)}, indent=2)


def is_native_dir(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


def read_config(directory: str | Path) -> NativeConfig:
    data = json.loads((Path(directory) / CONFIG_NAME).read_text())
    data.pop("format", None)
    return NativeConfig(**data)


# -- structure -------------------------------------------------------------------------------------------------
def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEADS


def _matches(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _linear_layers(model, targets: list[str] | None):
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _is_head(name) and "align_bottleneck" not in name:
            if targets is None or _matches(name, targets):
                yield name, module


def _bottleneck_module(dim: int, reduction: int, like):
    import torch

    class BottleneckAdapter(torch.nn.Module):
        """h + up(GELU(down(h))); `up` starts at zero."""

        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(dim, max(1, dim // reduction))
            self.up = torch.nn.Linear(max(1, dim // reduction), dim)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, h):
            return h + self.up(torch.nn.functional.gelu(self.down(h)))

    return BottleneckAdapter().to(device=like.device, dtype=like.dtype)


def _bottleneck_hook(module, args, output):
    if isinstance(output, tuple):  # attention blocks return (hidden states, attention weights, ...)
        return (module.align_bottleneck(output[0]), *output[1:])
    return module.align_bottleneck(output)


def _blocks(model, targets):
    import torch

    for name, module in model.named_modules():
        if _matches(name, targets) and not _is_head(name) and "align_bottleneck" not in name:
            width = module.out_features if isinstance(module, torch.nn.Linear) else None
            yield name, width


def _build(model, config: NativeConfig, fresh: bool) -> None:
    """Add the adapter's modules to `model` (zero biases / identity bottlenecks). `fresh` decides where they go
    (from the options); otherwise the recorded layers are used."""
    import torch

    modules = dict(model.named_modules())
    if config.kind == "bitfit":
        if fresh:
            config.added_biases = [n for n, m in _linear_layers(model, config.targets) if m.bias is None]
        for name in config.added_biases:
            layer = modules[name]
            layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features, device=layer.weight.device,
                                                        dtype=layer.weight.dtype))
    else:
        if fresh:
            config.modules = [n for n, _ in _blocks(model, config.targets or BOTTLENECK_TARGETS)]
            if not config.modules:
                raise AlignError("--adapter bottleneck: no attention/feed-forward block found (looked for "
                                 f"{', '.join(config.targets or BOTTLENECK_TARGETS)}). Name them with --target-modules.")
        hidden = getattr(model.config.get_text_config(), "hidden_size", None)
        like = next(model.parameters())
        for name in config.modules:
            block = modules[name]
            width = block.out_features if isinstance(block, torch.nn.Linear) else hidden
            block.align_bottleneck = _bottleneck_module(width, config.reduction, like)
            block.register_forward_hook(_bottleneck_hook)


def _trained_names(model, config: NativeConfig) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if _is_head(name):
            if config.task_type == "SEQ_CLS" and name.split(".")[0] in ("score", "classifier"):
                names.append(name)
        elif config.kind == "bitfit" and name.endswith(".bias"):
            layer = name[: -len(".bias")]
            if config.targets is None or _matches(layer, config.targets) or layer in config.added_biases:
                names.append(name)
        elif config.kind == "bottleneck" and ".align_bottleneck." in name:
            names.append(name)
    return names


# -- attach / save / load --------------------------------------------------------------------------------------
def attach(model, config: NativeConfig):
    """`model` with a fresh trainable native adapter; every other weight frozen."""
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(model, "name_or_path", None)
    _build(model, config, fresh=True)
    _set_trainable(model, config, True)
    model.align_adapter = config
    return model


def _set_trainable(model, config: NativeConfig, trainable: bool) -> None:
    model.requires_grad_(False)
    if trainable:
        for name in _trained_names(model, config):
            model.get_parameter(name).requires_grad_(True)


def state_dict(model) -> dict[str, Any]:
    config: NativeConfig = model.align_adapter
    return {name: model.get_parameter(name).detach().cpu().contiguous() for name in _trained_names(model, config)}


def save(model, directory: str | Path) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model), str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(model.align_adapter.to_json() + "\n")


def load(model, directory: str | Path, *, trainable: bool, top: bool = True):
    """Apply the saved adapter in `directory` to `model` (in place). `top`: it is the model's own (trainable or
    saved) adapter; otherwise it is part of the merged chain under a newer adapter."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    try:
        weights = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise AlignError(f"{directory}: the adapter weights cannot be read ({str(e)[:200]}); the file is damaged or "
                         "truncated. Restore the run, or retrain it.") from None
    try:
        _build(model, config, fresh=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                if name not in params:
                    if _is_head(name):  # a causal-LM parent under a reward model: no such head
                        continue
                    raise KeyError(name)
                params[name].copy_(value)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise AlignError(f"Base/adapter mismatch: the {config.kind} adapter in {directory} does not fit its base "
                         f"model ({str(e).splitlines()[0][:200]}).") from None
    if top:
        _set_trainable(model, config, trainable)
        model.align_adapter = config
    return model


def merge_problem(directory: str | Path) -> str | None:
    """Why the adapter in `directory` cannot be written into a plain transformers model directory (None if it can)."""
    config = read_config(directory)
    if config.kind == "bottleneck":
        return ("a bottleneck adapter adds modules the architecture does not have, so a plain model directory cannot "
                "hold it")
    if config.added_biases:
        return (f"bitfit added biases to layers this architecture has none in (e.g. {config.added_biases[0]}), so a "
                "plain model directory cannot hold them")
    return None


def frozen_copy(model):
    """A frozen deep copy of `model` (a reference model that includes its native adapter)."""
    import copy

    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()

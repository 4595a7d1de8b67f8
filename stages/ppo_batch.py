"""PPO's rollout batches: prompts and completions as padded tensors, and the per-token log-probs of a completion
under a model (the actor, the frozen reference), with the sampler's log-probs laid out the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Prompts left-padded to a common width `start`, completions right-padded after it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # (B, L) float: 1 on completion tokens
    start: int

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.start:]

    def rows(self, index: torch.Tensor) -> Batch:
        return Batch(self.input_ids[index], self.attention_mask[index], self.mask[index], self.start)

    @classmethod
    def build(cls, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int, device) -> Batch:
        width, length = max(map(len, prompt_ids)), max(1, max(map(len, completion_ids)))
        ids = torch.full((len(prompt_ids), width + length), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, width - len(p) : width + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention[i, width - len(p) : width + len(c)] = 1
        return cls(ids.to(device), attention.to(device), attention[:, width:].float().to(device), width)


def padded_rows(rows: list[list[float]] | None, like: torch.Tensor) -> torch.Tensor | None:
    """The sampler's per-token log-probs (a list per completion) as a tensor shaped like the trainer's."""
    if rows is None:
        return None
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
    return out


def completion_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """log π(a_t|s_t) of the completion tokens (B × L, float32), and the mean entropy over them if asked."""
    from align.stages.ppo_losses import entropy

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False).logits
    logits = logits[:, batch.start - 1 : -1].float() / max(temperature, 1e-7)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    return (logp, entropy(logits, batch.mask)) if with_entropy else logp


# -- the loop ----------------------------------------------------------------------------------------------------

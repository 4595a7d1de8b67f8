"""ppo's own loop across the processes of a launched run (align.launch): the collective operations it needs, each
the identity in one process."""

from __future__ import annotations

import torch


class Processes:
    """The processes of a launched run (align.launch) as ppo's loop needs them; in one process every method is the
    identity, so a 1-process run computes exactly what it did before scale-out.

    Actor and critic are adapters of one model, switched between forwards, so the loop does not hand the model to
    DDP (one forward, one backward per step): it averages the trainable gradients itself, once per optimizer step
    — the same all-reduce DDP does. Rollouts are sharded (each process samples its share of a step's prompts);
    whitening uses sums over every process, each process's per-token losses are weighted by its share of the
    micro-batch's tokens (so the averaged gradient is that of the per-token mean over all processes), and logged
    metrics are averaged over the processes. Minibatches are shuffled within each process: with
    --num-minibatches > 1 their composition differs from a 1-process run's (the same data, other splits).
    """

    def __init__(self):
        from align.launch import launched, state

        self.state = state() if launched() else None
        self.count = self.state.num_processes if self.state else 1
        self.index = self.state.process_index if self.state else 0
        self.device = self.state.device if self.state else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.total = self._total if self.count > 1 else None  # sum over processes (align.stages.advantages.whiten)

    def place(self, model):
        """`model` on this process's GPU (4-bit models are loaded there); unchanged on CPU."""
        if torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False):
            model.to(self.device)
        return model

    def _total(self, tensor: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import reduce

        return reduce(tensor.clone(), reduction="sum")

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._total(torch.cat([g.float().flatten() for g in grads])) / self.count
        for p, piece in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = piece.view_as(p).to(p.dtype)

    def token_share(self, mask: torch.Tensor) -> float:
        """n_k·N/Σn (n_k: this process's completion tokens in the micro-batch): a per-token mean times this share,
        averaged over the N processes, is the per-token mean over all their tokens — the 1-process loss. 1.0 alone."""
        if self.count == 1:
            return 1.0
        local = mask.sum()
        return float(local * self.count / self._total(local).clamp(min=1))

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in process order."""
        from accelerate.utils import gather_object

        return gather_object(items) if self.count > 1 else items

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.count == 1:
            return metrics
        everyone = self.gather([metrics])
        return {k: mean_or_nan(m[k] for m in everyone if k in m) for k in dict.fromkeys(k for m in everyone for k in m)}

    def wait(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()


def mean_or_nan(values) -> float:
    """The mean of `values` (any iterable), NaN when empty."""
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")

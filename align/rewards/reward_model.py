"""Score text with a finished `align rm` run.

The reward of a (prompt, completion) pair is the model's scalar output on the chat-template rendering of the
whole conversation — the same rendering TRL's RewardTrainer trained on. `RewardModelScorer` follows the reward
protocol `fn(prompts, completions, **columns) -> list[float]`, so an rm run plugs in wherever a reward
function does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, str]]


def as_messages(value: str | Conversation, role: str) -> Conversation:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


class RewardModelScorer:
    """Callable reward source backed by an rm run directory."""

    def __init__(self, run: str | Path, batch_size: int = 16):
        from align.handoff import load_run_policy

        self.model, self.tokenizer, self.manifest = load_run_policy(run)
        if self.manifest.get("task") != "seq-cls":
            from align.errors import AlignError

            raise AlignError(f"{run} is a {self.manifest.get('stage')!r} run, not a reward model (align rm).")
        self.model.eval()
        self.batch_size = batch_size
        self.__name__ = f"reward_model:{Path(run).name}"

    def score(self, prompts: list[str | Conversation], completions: list[str | Conversation]) -> list[float]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(as_messages(p, "user") + as_messages(c, "assistant"), tokenize=False)
            for p, c in zip(prompts, completions, strict=True)
        ]
        self.tokenizer.padding_side = "right"
        scores: list[float] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
            with torch.no_grad():
                scores.extend(self.model(**batch).logits[:, 0].float().tolist())
        return scores

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        return self.score(prompts, completions)

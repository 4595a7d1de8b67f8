"""Score text with a finished `align rm` run.

The reward of a (prompt, completion) pair is the model's scalar output on the chat-template rendering of the
whole conversation — the same rendering TRL's RewardTrainer trained on, and `align rm`'s pointwise training
(`render`). `RewardModelScorer` follows the reward protocol `fn(prompts, completions, **columns) -> list[float]`,
so an rm run plugs in wherever a reward function does: pairwise or pointwise alike, the reward is the head's raw
output (a pointwise binary RM: the logit, not the probability; a regression RM: the predicted score). A pointwise
RM with several heads (several label columns) serves as a reward only with the head named: the spec `RUN(head="NAME")`
(refused without it: which head would it be?); `align rm score` and `align eval` report every head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Conversation = list[dict[str, str]]


def as_messages(value: str | Conversation, role: str) -> Conversation:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def render(tokenizer, example: dict[str, Any]) -> str:
    """The text a reward model reads: a `text` as is, or the chat-template rendering of prompt + completion, with
    the example's `tools` when it has them, as TRL's RewardTrainer renders tool-calling pairs (tokenized without
    added special tokens, by training and scoring alike)."""
    if "text" in example:
        return example["text"]
    conversation = as_messages(example["prompt"], "user") + as_messages(example["completion"], "assistant")
    return tokenizer.apply_chat_template(conversation, tools=example.get("tools") or None, tokenize=False)


def heads(manifest: dict[str, Any]) -> list[str]:
    """The names of a reward-model run's outputs: its label columns (pointwise), else one 'reward'."""
    return list((manifest.get("reward_model") or {}).get("heads") or ["reward"])


class RewardModelScorer:
    """Callable reward source backed by an rm run directory.

    The run is checked when the scorer is made (cheap: its manifest); its model is loaded on the first call. A
    stage that already holds the reward model's base can `place_on` it: the scorer then runs the reward model as a
    frozen adapter + head on that model instead of loading a copy (align ppo does this; same numbers, tested).
    """

    def __init__(self, run: str | Path, batch_size: int = 16, trust_remote_code: bool = False, all_heads: bool = False,
                 head: str | None = None):
        from align.errors import AlignError, unknown_name
        from align.handoff import resolve_parent
        from align.models import load_tokenizer

        parent = resolve_parent(run, child_stage="load")
        if parent.manifest.get("task") != "seq-cls":
            raise AlignError(f"{run} is a {parent.stage!r} run, not a reward model (align rm).")
        self.heads = heads(parent.manifest)
        if head is not None and head not in self.heads:
            raise AlignError(f"{run}(head={head!r}): " + unknown_name("head", head, self.heads))
        if len(self.heads) > 1 and head is None and not all_heads:
            raise AlignError(f"{run} is a reward model with {len(self.heads)} heads ({', '.join(self.heads)}); a reward "
                             f"is one number per completion. Name the head in a reward spec: --reward '{run}(head=\"{self.heads[0]}\")'.")
        self.head = self.heads.index(head) if head is not None else 0  # the output `score` and a reward return
        self.tokenizer = load_tokenizer(str(parent.weights_dir))
        self.batch_size, self.trust_remote_code = batch_size, trust_remote_code
        self.placed: tuple[Any, str, Any] | None = None  # (model, adapter, head) when placed on another model
        self._model = None
        self.run, self.manifest = Path(run), parent.manifest
        self.__name__ = f"reward_model:{Path(run).name}" + (f":{head}" if head is not None and len(self.heads) > 1 else "")

    @property
    def model(self):
        if self._model is None:
            from align.handoff import load_run_policy

            self._model = load_run_policy(self.run, trust_remote_code=self.trust_remote_code)[0]
            self._model.eval()
        return self._model

    def place_on(self, model, adapter: str, head) -> None:
        """Score with `model`'s frozen `adapter` and `head` (the reward model's weights on the same base)."""
        self.placed = (model, adapter, head)

    def _logits(self, batch) -> Any:
        """[batch, heads] outputs."""
        if self.placed is None:
            return self.model(**batch).logits
        import torch

        from align.models import activate, backbone

        model, adapter, head = self.placed
        activate(model, adapter)
        hidden = backbone(model)(**batch, use_cache=False).last_hidden_state
        # pooled like transformers' *ForSequenceClassification: at the last token that is not padding
        ids = batch["input_ids"]
        last = (torch.arange(ids.shape[1], device=ids.device) * (ids != self.tokenizer.pad_token_id)).argmax(-1)
        pooled = hidden[torch.arange(len(ids), device=ids.device), last]
        return head(pooled.to(head.weight.dtype))

    def score(self, prompts: list[str | Conversation], completions: list[str | Conversation],
              tools: list[list[dict] | None] | None = None) -> list[float]:
        """The reward head's output for each (prompt, completion) (the named head, else the only one); `tools`: each
        pair's tool schemas, when its conversations call tools."""
        tools = tools or [None] * len(prompts)
        texts = [render(self.tokenizer, {"prompt": p, "completion": c, "tools": t})
                 for p, c, t in zip(prompts, completions, tools, strict=True)]
        return [row[self.head] for row in self.score_texts(texts)]

    def score_pairs(self, pairs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(chosen scores, rejected scores) of preference pairs, each rendered with its own tools (if any)."""
        prompts, tools = [p["prompt"] for p in pairs], [p.get("tools") for p in pairs]
        return (self.score(prompts, [p["chosen"] for p in pairs], tools),
                self.score(prompts, [p["rejected"] for p in pairs], tools))

    def score_texts(self, texts: list[str]) -> list[list[float]]:
        """Every head's output for each rendered text (see `render`)."""
        import torch

        self.tokenizer.padding_side = "right"
        scores: list[list[float]] = []
        device = next((self.placed[0] if self.placed else self.model).parameters()).device
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
            with torch.no_grad():
                scores.extend(self._logits(batch).float().tolist())
        return scores

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        return self.score(prompts, completions)


def allow_remote_code(guarded: list, trust_remote_code: bool) -> list:
    """Pass the command's --trust-remote-code to the reward-model scorers among `guarded` rewards (they are built from
    specs, without it); returns `guarded`."""
    for g in guarded:
        if isinstance(g.reward.fn, RewardModelScorer):
            g.reward.fn.trust_remote_code = trust_remote_code
    return guarded

"""Multi-turn rollouts with tools: generate → parse the model's tool calls → run them → append the results as `tool`
messages rendered by the chat template → generate again, until the model answers without a tool call or has had
`--max-tool-calls` tool-calling turns. Used by `align grpo` (through TRL's `rollout_func`) and `align eval`, on either
rollout backend (align.stages.rollout: the engine only ever sees token ids, so hf and vllm run the same loop).

What a rollout returns, per row (`Conversations`):
- completion_ids: every token after the prompt — the model's turns and the rendered tool results, in order;
- model_mask: 1 on the model's own tokens, 0 on the tool-result tokens. It goes to TRL's GRPOTrainer as `env_mask`
  (its name for it in `rollout_func`'s output), which TRL turns into `tool_mask`: the loss, the entropy, the KL and
  the importance-sampling ratios cover the model's tokens only;
- logprobs: the sampler's log-probs of the model's tokens, 0.0 at tool-result tokens (masked out; TRL's own loop
  does the same), so `--is-correction` and `--sync-check` line up with the model tokens;
- conversation: the messages after the prompt (assistant turns as generated, tool results), and the rollout's
  environment instance: rewards receive them as the `conversation` and `environments` keywords. The `completions`
  rewards receive are the decoded completion_ids, tool results included: the whole conversation after the prompt.

`as_messages` turns a rollout's conversation into the data form sft / dpo / kto / rm read (assistant `tool_calls`,
`tool` messages; `align pairs` writes it); `template_problem` refuses a chat template that does not show the tools.

Borrowed from TRL 1.16's GRPOTrainer (`_tool_call_loop`, `_get_tool_suffix_ids`): the token-level concatenation
prompt + completion + tool suffix (no re-tokenisation of what the model generated), the suffix computed as the
difference of two chat-template renderings trimmed at the last EOS, and dropping a tool result that would push the
completion past `--max-completion-length` (the rollout then ends with the model's turn). Not used, and why: TRL's
loop runs only with its own generation (`_generate_single_turn`), not after a `rollout_func`, so it cannot drive
align's engines; it parses calls only with a tokenizer `response_schema` (align's tiny model has none — here the
`<tool_call>{json}</tool_call>` blocks are parsed directly); and it calls tools without a deadline (here each call
is guarded with `--tool-timeout`, align.rewards.tools.Rollout.call). Environments' `reset(**row)` and
`get_reward()` (TRL's environment protocol) are not called: rollout_func does not receive the data rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.rewards.tools import ToolSet, ToolStats, parse_tool_calls


@dataclass
class Conversations:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    model_mask: list[list[int]]
    logprobs: list[list[float]] | None
    conversation: list[list[dict[str, Any]]]
    environments: list[Any]
    stats: ToolStats = field(default_factory=ToolStats)

    def texts(self, tokenizer) -> list[str]:
        """Each row's completion decoded (the model's turns and the tool results)."""
        return tokenizer.batch_decode(self.completion_ids, skip_special_tokens=True)


def tool_suffix_ids(tokenizer, tool_messages: list[dict[str, Any]]) -> list[int]:
    """The tokens the chat template puts after an assistant turn that called tools: the tool results, and the
    generation prompt of the next assistant turn (TRL's `_get_tool_suffix_ids`: render a minimal conversation with
    and without the results; the suffix is the difference after the assistant turn's EOS)."""
    calls = [{"type": "function", "function": {"name": m["name"], "arguments": {}}} for m in tool_messages]
    head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = _ids(tokenizer, tokenizer.apply_chat_template(head, tokenize=False))
    full = _ids(tokenizer, tokenizer.apply_chat_template(head + tool_messages, tokenize=False, add_generation_prompt=True))
    eos = [i for i, tok in enumerate(prefix) if tok == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[: eos[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError("The chat template renders an assistant turn differently when tool results follow it; "
                         "multi-turn rollouts need a template where the conversation so far is a prefix.")
    return full[len(prefix):]


def template_problem(tokenizer, schemas: list[dict[str, Any]]) -> str | None:
    """Why multi-turn rollouts cannot run with this tokenizer, or None: its chat template must show the tools to the
    model (a template that ignores `tools=`, like align's plain-text fallback for tokenizers without one, would
    offer tools the model never sees)."""
    probe = [{"role": "user", "content": "x"}]
    shown = tokenizer.apply_chat_template(probe, tools=schemas, tokenize=False, add_generation_prompt=True)
    if shown == tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True):
        return ("its chat template does not render tools (the prompt is the same with and without them), so the "
                "model would never see the tools it is offered. Use a model whose chat template takes `tools` "
                "(e.g. Qwen2.5's, or `align tiny-model`'s), or drop --tool / --environment.")
    return None


def as_messages(tokenizer, conversation: list[dict[str, Any]], schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rollout's conversation in the data form sft, dpo, kto and rm read (align.data.formats): an assistant turn
    whose `<tool_call>` blocks all parse becomes {"role": "assistant", "content": its text before the calls,
    "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]} when the chat template renders that
    form exactly as the model wrote the turn; any other turn (no call, a malformed call, or text the template would
    render differently) stays as the model wrote it. `tool` messages are kept as they are."""
    out = []
    for message in conversation:
        structured = _with_tool_calls(message) if message["role"] == "assistant" else None
        if structured is not None and _render_turn(tokenizer, structured, schemas) == \
                _render_turn(tokenizer, message, schemas):
            message = structured
        out.append(dict(message))
    return out


def _with_tool_calls(message: dict[str, Any]) -> dict[str, Any] | None:
    text = message["content"]
    calls = parse_tool_calls(text)
    if not calls or any(isinstance(c, str) or not isinstance(c.get("arguments", {}), dict) for c in calls):
        return None
    content = text[: text.index("<tool_call>")]
    return {"role": "assistant", "content": content[:-1] if content.endswith("\n") else content,
            "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                           for c in calls]}


def _render_turn(tokenizer, message: dict[str, Any], schemas: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": "x"}, message], tools=schemas, tokenize=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turn_seeds(seeds: list[int] | None, rows: list[int], turn: int) -> dict[str, Any]:
    if seeds is None:
        return {}
    return {"seeds": [(seeds[i] * 1_000_003 + turn) % (2**63) if turn else seeds[i] for i in rows]}


def run_conversations(engine, model, prompts: list[Any], toolset: ToolSet, max_tool_calls: int,
                      max_completion_length: int, seeds: list[int] | None = None) -> Conversations:
    """Sample one multi-turn rollout per prompt with `engine` (align.stages.rollout); see the module docstring."""
    from align.stages.rollout import render_prompts

    tokenizer = engine.tokenizer
    prompt_ids = render_prompts(tokenizer, prompts, tools=toolset.schemas())
    rollouts = [toolset.for_rollout() for _ in prompts]
    n = len(prompts)
    out = Conversations(prompt_ids, [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                        [[] for _ in range(n)], [r.environment for r in rollouts])
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    active, turn = list(range(n)), 0
    while active:
        new_ids, new_logps = engine.generate(model, [prompt_ids[i] + out.completion_ids[i] for i in active],
                                             **_turn_seeds(seeds, active, turn))
        if new_logps is None:
            out.logprobs = None
        still = []
        for k, i in enumerate(active):
            budget = max_completion_length - len(out.completion_ids[i])
            ids = list(new_ids[k][:budget])
            out.completion_ids[i] += ids
            out.model_mask[i] += [1] * len(ids)
            if out.logprobs is not None:
                out.logprobs[i] += list(new_logps[k][: len(ids)])
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.conversation[i].append({"role": "assistant", "content": text})
            ended = bool(ids) and (ids[-1] in stops or len(new_ids[k]) < engine.sampling.max_new_tokens) \
                and len(new_ids[k]) <= budget
            calls = parse_tool_calls(text)
            if not calls or not ended or turn >= max_tool_calls:
                continue
            results = [rollouts[i].call(call, out.stats) for call in calls]
            messages = [{"role": "tool", "name": name, "content": content} for name, content in results]
            suffix = tool_suffix_ids(tokenizer, messages)
            if len(out.completion_ids[i]) + len(suffix) >= max_completion_length:
                continue  # no room for the results and an answer: the rollout ends with the model's turn
            out.conversation[i] += messages
            out.completion_ids[i] += suffix
            out.model_mask[i] += [0] * len(suffix)
            if out.logprobs is not None:
                out.logprobs[i] += [0.0] * len(suffix)
            still.append(i)
        active, turn = still, turn + 1
    return out

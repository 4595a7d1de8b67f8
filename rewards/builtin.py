"""Built-in rewards. Each is a factory: its keyword arguments are the reward's settings, and it returns a
function with the reward protocol `fn(prompts, completions, **columns) -> list[float | None]`.

    accuracy(column="answer", mode="numeric", tolerance=1e-6)
        1.0 if the completion's final answer equals the `column` value, else 0.0 (None when the sample has no
        reference answer, or an empty one). The final answer is the text inside <answer>...</answer> if present, else the whole
        completion; mode "numeric" compares the last number in it (so "The answer is 19." matches "19"), read
        as people write numbers ("1,234", "$1,234.50" and "12%" are 1234, 1234.5 and 12; "#### 1,234" matches 1234),
        mode "exact" the stripped text; mode "math" compares mathematically with math-verify (LaTeX, \\boxed{},
        fractions, sets: "\\boxed{\\frac{3}{4}}" matches "0.75"; `pip install 'align[math]'`), for GSM8K/MATH-style
        data — the answer tags are not needed there: math-verify finds the final answer itself.
        In a multi-turn rollout with tools (the `conversation` keyword), the final answer is read from the model's
        last turn only, never from a tool's result: a model that calls the calculator and then says nothing scores 0.
    closeness(column="answer", scale=10.0)
        Partial credit for numeric answers: max(0, 1 − |answer − reference| / scale) on the last number of the
        completion's final answer (with tools, of the model's last turn, as accuracy); 0 when it has no number, None
        when the sample has no reference.
    format(pattern=r"^<think>.*?</think>\\s*<answer>.*?</answer>$")
        1.0 if the completion matches the regular expression (DOTALL, whole completion), else 0.0.
    length(max_length=256, cache=64)
        DAPO's soft overlong punishment on the completion's length L in tokens (words if no token ids):
        0 if L <= max_length - cache; (max_length - cache - L) / cache in the cache zone; -1 beyond max_length.
    positive(column="product")
        The gold verifier of the bundled `reviews` task (a labeller's rule, written down): 1.0 if the review is on
        topic — it names the `column` value as a word ("kettle", not "kettlebell") — and positive — more words of
        POSITIVE_WORDS ("good reliable solid pleasant") than of NEGATIVE_WORDS ("bad noisy awful useless"),
        case-insensitive; else 0.0 (an empty review is 0.0). None
        when the sample has no product. The task's SFT reviews use exactly these words (align.data.samples).

Specs pick them by name, with settings and a weight: `accuracy`, `format(pattern="^\\d+$")@0.5`, `length(max_length=32)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float | None]]
# a number as people write it: "-3", "19.5", "1,234", "$1,234.50", "12%" (the sign may precede a currency symbol)
NUMBER = re.compile(r"([-\u2212]?)[$€£]?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def numbers(text: str) -> list[float]:
    """Every number in `text`, read the way people write them ("1,234" = 1234, "$1,234.50" = 1234.5, "12%" = 12,
    "−3" with the typographic minus = -3)."""
    return [float(("-" if sign else "") + digits.replace(",", "")) for sign, digits in NUMBER.findall(text)]


def final_answer(text: str) -> str:
    tagged = ANSWER_TAG.findall(text)
    return tagged[-1].strip() if tagged else text.strip()


def accuracy(column: str = "answer", mode: str = "numeric", tolerance: float = 1e-6) -> RewardFn:
    if mode not in ("numeric", "exact", "math"):
        raise ValueError(f"accuracy: mode must be 'numeric', 'exact' or 'math', got {mode!r}")
    if mode == "math":
        return _math_accuracy(column)

    def matches(completion: Any, reference: Any) -> float | None:
        if reference is None or not str(reference).strip():  # no reference answer: not applicable (not 1.0 for "")
            return None
        answer = final_answer(completion_text(completion))
        if mode == "exact":
            return float(answer == str(reference).strip())
        got, want = numbers(answer), numbers(str(reference))
        if not want:
            return float(answer == str(reference).strip())
        return float(bool(got) and abs(got[-1] - want[-1]) <= tolerance)

    return _per_sample(column, matches, "accuracy_reward")


def _math_accuracy(column: str) -> RewardFn:
    """accuracy(mode="math"): math-verify's parse + verify (gold first); None where the reference does not parse."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ValueError("accuracy(mode='math') needs math-verify: pip install 'align[math]' "
                         "(or pip install math-verify)") from None

    def matches(completion: Any, reference: Any) -> float | None:
        if reference is None or not str(reference).strip():
            return None
        # no signal-based timeouts: rewards may run in a worker thread, and the guard enforces --reward-timeout
        gold = parse(str(reference), parsing_timeout=None)
        if not gold:
            return None
        answer = parse(completion_text(completion), parsing_timeout=None)
        return float(verify(gold, answer, timeout_seconds=None))

    return _per_sample(column, matches, "accuracy_reward")


def last_turn(conversation: list[dict[str, Any]]) -> str:
    """The content of the model's last turn in a multi-turn rollout ("" if it has none)."""
    return next((m.get("content") or "" for m in reversed(conversation) if m.get("role") == "assistant"), "")


def _per_sample(column: str, matches: Callable[[Any, Any], float | None], name: str) -> RewardFn:
    """A reward function applying `matches(completion, reference)` with the `column` value of each sample."""

    def reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        if column not in columns:
            from align.rewards.call import data_columns

            raise KeyError(f"{name.removesuffix('_reward')} needs a '{column}' column in the data (its columns: "
                           f"{', '.join(data_columns(columns)) or 'none besides the prompt'}); set "
                           f"{name.removesuffix('_reward')}(column=...) to use another")
        conversations = columns.get("conversation")  # multi-turn rollouts with tools: the answer is the model's
        if conversations is not None:  # last turn, never a tool's result (calling the calculator is not answering)
            completions = [last_turn(conv) for conv in conversations]
        return [matches(c, ref) for c, ref in zip(completions, columns[column], strict=True)]

    reward.__name__ = name
    reward.columns = (column,)  # checked against the data before training (align.rewards.call.missing_columns)
    return reward


def closeness(column: str = "answer", scale: float = 10.0) -> RewardFn:
    if scale <= 0:
        raise ValueError(f"closeness: scale must be positive, got {scale}")

    def close(completion: Any, reference: Any) -> float | None:
        if reference is None:
            return None
        got, want = numbers(final_answer(completion_text(completion))), numbers(str(reference))
        if not want:
            return None
        return max(0.0, 1.0 - abs(got[-1] - want[-1]) / scale) if got else 0.0

    return _per_sample(column, close, "closeness_reward")


def format(pattern: str = r"^<think>.*?</think>\s*<answer>.*?</answer>$") -> RewardFn:  # noqa: A001
    regex = re.compile(pattern, re.DOTALL)

    def format_reward(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [float(bool(regex.match(completion_text(c).strip()))) for c in completions]

    return format_reward


POSITIVE_WORDS = ("good", "reliable", "solid", "pleasant")
NEGATIVE_WORDS = ("bad", "noisy", "awful", "useless")


def positive(column: str = "product") -> RewardFn:
    def judge(completion: Any, product: Any) -> float | None:
        if product is None or not str(product).strip():
            return None
        words = re.findall(r"[a-z]+", completion_text(completion).lower())
        on_topic = str(product).strip().lower() in words
        score = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        return float(on_topic and score > 0)

    return _per_sample(column, judge, "positive_reward")


def length(max_length: int = 256, cache: int = 64) -> RewardFn:
    if not 0 < cache <= max_length:
        raise ValueError(f"length: need 0 < cache <= max_length, got cache={cache}, max_length={max_length}")

    def penalty(n: int) -> float:
        if n <= max_length - cache:
            return 0.0
        if n <= max_length:
            return (max_length - cache - n) / cache
        return -1.0

    def length_reward(prompts: list, completions: list, completion_ids: list | None = None, **columns: Any):
        sizes = [len(ids) for ids in completion_ids] if completion_ids is not None else \
            [len(completion_text(c).split()) for c in completions]
        return [penalty(n) for n in sizes]

    return length_reward


BUILTINS: dict[str, Callable[..., RewardFn]] = {"accuracy": accuracy, "closeness": closeness, "format": format,
                                                "length": length, "positive": positive}

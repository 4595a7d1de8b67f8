"""Bundled sample datasets, addressable by name wherever a dataset is expected (`--data arith`).

They are generated deterministically by this module; regenerate with `python -m align.data.samples`.

- `arith`       SFT, `messages` format: "What is 12 + 7?" -> "19" (2000 examples, operands 0-49, + and -)
- `arith-eval`  the held-out split of the same task (200 examples, disjoint from `arith`)
- `arith-prefs` preferences on the same task: chosen = the right answer, bare; rejected = a wrong answer,
  hedged ("Maybe 41?"): learnable by a tiny model from the form alone (1000 pairs)
- `arith-prefs-eval`  held-out preference pairs (200)
- `arith-prompts`  prompts with an `answer` column, for online RL (GRPO/PPO) (500; `-eval`: 100)
- `addition`, `addition-prompts`, `addition-eval`  the addition demo (recipes/addition.yaml): every "a + b" with
  a, b in 0-49 (2500 problems), shuffled once and split three ways, disjoint: 1500 SFT conversations, 500 RL prompts
  with answers (pairs, grpo, ppo), and 500 held-out prompts with answers that no stage trains on
- `addition-train-prompts`  the 2000 problems that sft and RL train on (`addition`'s 1500 and `addition-prompts`' 500)
  as prompts with answers: on-policy preference pairs for a reward model on every training problem, never on the
  held-out ones
- `reviews`, `reviews-prompts`, `reviews-eval`  the RLHF task (recipes/demo.yaml, recipes/rlhf.yaml), where judging is
  easier than producing: "Write a review of the kettle." -> "The kettle is solid and reliable." (80 products, 5 ways to
  ask). Each product has its own share p of positive adjectives in the SFT reviews: 32 products mostly negative
  (p 0.15-0.35; the lantern's is 0.15), 48 mostly positive (0.7-0.9), none near 1/2 (`REVIEW_BANDS`); 1 review in 10
  names another product (off topic). So the sft policy writes a positive, on-topic review for some prompts and not
  others, and how many varies little with the seed. The 400 (phrasing, product) prompts are split
  disjointly: 250 train prompts (2500 SFT reviews, 10 each; the same 250 as RL prompts with a `product` column) and 150 held-out prompts
  with a `product` column that no stage trains on (all 5 of one product, the rake, among them). The gold verifier
  is the built-in reward `positive`
- `mult-tools`, `mult-direct`, `mult-prompts`, `mult-eval`  the tools demo (recipes/tools.yaml): "What is 4821 * 37?"
  (a 4-digit number times a 2-digit one, the product 6 digits long). `mult-tools`: 6000 SFT traces with the calculator (`tools` column; the
  assistant calls calculator(expression="4821 * 37"), reads the result, answers it); `mult-direct`: the same 6000
  problems answered directly (no tool), to train the comparison model; both generated when loaded (4.9 MB as files).
  `mult-prompts`: 300 RL prompts and `mult-eval`: 200 held-out prompts, with answers; the three problem sets disjoint
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path

SAMPLES_DIR = Path(str(resources.files(__name__)))  # package data of align.data.samples (data/samples/ in the repo)
BUNDLED: dict[str, str] = {
    "arith": "arith_sft.jsonl",
    "arith-eval": "arith_sft_eval.jsonl",
    "arith-prefs": "arith_prefs.jsonl",
    "arith-prefs-eval": "arith_prefs_eval.jsonl",
    "arith-prompts": "arith_prompts.jsonl",
    "arith-prompts-eval": "arith_prompts_eval.jsonl",
    "addition": "addition_sft.jsonl",
    "addition-prompts": "addition_prompts.jsonl",
    "addition-eval": "addition_eval.jsonl",
    "addition-train-prompts": "addition_train_prompts.jsonl",
    "reviews": "reviews_sft.jsonl",
    "reviews-prompts": "reviews_prompts.jsonl",
    "reviews-eval": "reviews_eval.jsonl",
    "mult-prompts": "mult_prompts.jsonl",
    "mult-eval": "mult_eval.jsonl",
}


def bundled_path(name: str) -> Path | None:
    """Path of the bundled dataset called `name`, or None."""
    return SAMPLES_DIR / BUNDLED[name] if name in BUNDLED else None


def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 50) -> list[tuple[int, str, int, int]]:
    """`n` distinct (a, op, b, answer) problems with op in {+, -}."""
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    out = []
    while len(out) < n:
        a, b, op = rng.randrange(max_operand), rng.randrange(max_operand), rng.choice("+-")
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append((a, op, b, a + b if op == "+" else a - b))
    return out


def arithmetic_sft_records(n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    problems = arithmetic_problems(n_train + n_eval, seed=seed)

    def record(a: int, op: str, b: int, ans: int) -> dict:
        return {
            "messages": [
                {"role": "user", "content": f"What is {a} {op} {b}?"},
                {"role": "assistant", "content": str(ans)},
            ]
        }

    records = [record(*p) for p in problems]
    return records[:n_train], records[n_train:]


def arithmetic_preference_records(n_train: int = 1000, n_eval: int = 200, seed: int = 1) -> tuple[list[dict], list[dict]]:
    """prompt / chosen (the right answer) / rejected (a hedged wrong answer: off by 1-9 or the sign flipped)."""
    rng = random.Random(seed)
    hedges = ["Maybe {}?", "I think it is {}.", "Probably {}, not sure.", "It could be {}."]
    records = []
    for a, op, b, ans in arithmetic_problems(n_train + n_eval, seed=seed):
        wrong = -ans if ans != 0 and rng.random() < 0.3 else ans + rng.choice([-1, 1]) * rng.randint(1, 9)
        rejected = rng.choice(hedges).format(wrong)
        records.append({"prompt": f"What is {a} {op} {b}?", "chosen": str(ans), "rejected": rejected})
    return records[:n_train], records[n_train:]


def arithmetic_prompt_records(n_train: int = 500, n_eval: int = 100, seed: int = 2) -> tuple[list[dict], list[dict]]:
    records = [{"prompt": f"What is {a} {op} {b}?", "answer": str(ans)}
               for a, op, b, ans in arithmetic_problems(n_train + n_eval, seed=seed)]
    return records[:n_train], records[n_train:]


def addition_records(max_operand: int = 50, n_eval: int = 500, n_sft: int = 1500, seed: int = 0):
    """(sft conversations, RL prompts, held-out prompts, train prompts): every a + b with a, b < max_operand, split
    disjointly (the train prompts are the sft conversations' and the RL prompts' problems, with their answers)."""
    problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(problems)
    held, sft, rl = problems[:n_eval], problems[n_eval : n_eval + n_sft], problems[n_eval + n_sft :]

    def prompts(part):
        return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in part]

    conversations = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                   {"role": "assistant", "content": str(a + b)}]} for a, b in sft]
    return conversations, prompts(rl), prompts(held), prompts(sft + rl)


REVIEW_PRODUCTS = (
    "kettle toaster lamp chair desk phone camera blender backpack umbrella jacket scarf mug teapot "
    "blanket pillow mattress sofa bookshelf printer monitor keyboard mouse headset speaker radio clock watch wallet "
    "bicycle helmet tent lantern stove fridge freezer oven microwave dishwasher vacuum iron heater fan router tablet "
    "laptop charger cable drill hammer ladder shovel rake hose grill skillet wok knife spoon fork plate bowl glass "
    "bottle thermos candle mirror rug curtain towel soap shampoo razor brush comb teacup saucepan scooter stapler "
    "notebook"
).split()
# 2 in 5 products mostly negative, 3 in 5 mostly positive, none near 1/2: how many greedy reviews of the sft policy are
# positive varies little with the seed, and RL has the negative products to turn (README "The demo, measured")
REVIEW_BANDS = ((0.4, 0.15, 0.35), (0.6, 0.7, 0.9))
REVIEW_PROMPTS = ("Write a review of the {}.", "Review the {}.", "What do you think of the {}?", "How is the {}?",
                  "Tell me about the {}.")


def review_records(n_eval: int = 150, per_prompt: int = 10, off_topic: float = 0.1,
                   bands: tuple[tuple[float, float, float], ...] = REVIEW_BANDS, seed: int = 4):
    """(sft conversations, RL prompts, held-out prompts) of the reviews task: "The <product> is <adj> and <adj>.",
    each adjective positive with the product's own probability p. `bands`: (fraction of the products, lowest p,
    highest p) — each band's products get shares spread evenly over its range, assigned in a seeded order; the
    adjectives are the `positive` verifier's lexicon. The prompt split is drawn before any review, so `bands` changes
    the SFT reviews only, never the RL or held-out prompts."""
    from align.rewards.builtin import NEGATIVE_WORDS, POSITIVE_WORDS

    rng = random.Random(seed)
    products = list(REVIEW_PRODUCTS)
    counts = [round(fraction * len(products)) for fraction, _, _ in bands]
    if sum(counts) != len(products):
        raise ValueError(f"review bands cover {sum(counts)} of the {len(products)} products; their fractions must sum to 1")
    rates = [low + (high - low) * i / max(n - 1, 1) for n, (_, low, high) in zip(counts, bands, strict=True)
             for i in range(n)]
    rng.shuffle(rates)
    share = dict(zip(products, rates, strict=True))
    prompts = [(template, product) for product in products for template in REVIEW_PROMPTS]
    rng.shuffle(prompts)
    held, train = prompts[:n_eval], prompts[n_eval:]

    def review(product: str) -> str:
        named = rng.choice([p for p in products if p != product]) if rng.random() < off_topic else product
        first, second = (POSITIVE_WORDS if rng.random() < share[product] else NEGATIVE_WORDS for _ in "ab")
        word = rng.choice(first)
        return f"The {named} is {word} and {rng.choice([w for w in second if w != word])}."

    conversations = [{"messages": [{"role": "user", "content": template.format(product)},
                                   {"role": "assistant", "content": review(product)}]}
                     for template, product in train for _ in range(per_prompt)]
    rng.shuffle(conversations)

    def rows(part):
        return [{"prompt": template.format(product), "product": product} for template, product in part]

    return conversations, rows(train), rows(held)


def multiplication_problems(n: int, seed: int = 3, digits: tuple[int, int, int] = (4, 2, 6)) -> list[tuple[int, int]]:
    """`n` distinct (a, b) with a of digits[0] digits, b of digits[1] digits and a * b of digits[2] digits, in a fixed
    seeded order. One length per number keeps every copy (question -> call, result -> answer) at a fixed distance."""
    rng = random.Random(seed)
    (lo_a, hi_a), (lo_b, hi_b), (lo_p, hi_p) = ((10 ** (d - 1), 10**d) for d in digits)
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n:
        pair = (rng.randrange(lo_a, hi_a), rng.randrange(lo_b, hi_b))
        if pair not in seen and lo_p <= pair[0] * pair[1] < hi_p:
            seen.add(pair)
            out.append(pair)
    return out


MULT_EVAL, MULT_RL, MULT_SFT = 200, 300, 6000  # the tools demo's splits: held-out first, so they never change


def multiplication_records(n_sft: int = MULT_SFT, n_rl: int = MULT_RL, n_eval: int = MULT_EVAL, seed: int = 3,
                           digits: tuple[int, int, int] = (4, 2, 6)):
    """(tool traces, direct conversations, RL prompts, held-out prompts) for the tools demo: a * b with a 4-digit a,
    a 2-digit b and a 6-digit product (`digits`, as in `multiplication_problems`). The held-out problems come first in
    the seeded order, then the RL prompts, then the SFT problems, so the splits are disjoint and the held-out set stays
    the same whatever `n_sft` is. The traces and the direct conversations are the same problems: with the calculator
    (the assistant calls calculator(expression="4821 * 37"), reads the result, answers it; a `tools` column) and
    answered directly ("4821 * 37" -> "178377")."""
    from align.rewards.tools import ToolSet

    problems = multiplication_problems(n_eval + n_rl + n_sft, seed, digits)
    held, rl, sft = problems[:n_eval], problems[n_eval : n_eval + n_rl], problems[n_eval + n_rl :]
    schemas = ToolSet.resolve(["calculator"], None).schemas()

    def trace(a: int, b: int) -> dict:
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}}
        return {"messages": [{"role": "user", "content": f"What is {a} * {b}?"},
                             {"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "name": "calculator", "content": str(a * b)},
                             {"role": "assistant", "content": str(a * b)}], "tools": schemas}

    def direct(a: int, b: int) -> dict:
        return {"messages": [{"role": "user", "content": f"What is {a} * {b}?"},
                             {"role": "assistant", "content": str(a * b)}]}

    def prompts(part):
        return [{"prompt": f"What is {a} * {b}?", "answer": str(a * b)} for a, b in part]

    return [trace(a, b) for a, b in sft], [direct(a, b) for a, b in sft], prompts(rl), prompts(held)


# Generated when loaded, not stored (too large to ship as files): name -> rows. Deterministic: the same rows every time
GENERATED: dict[str, Callable[[], list[dict]]] = {
    "mult-tools": lambda: multiplication_records()[0],
    "mult-direct": lambda: multiplication_records()[1],
}


def is_bundled(name: str) -> bool:
    """`name` is a bundled sample dataset (a file here, or generated when loaded)."""
    return name in BUNDLED or name in GENERATED


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    for name, make in (("arith", arithmetic_sft_records), ("arith-prefs", arithmetic_preference_records),
                       ("arith-prompts", arithmetic_prompt_records)):
        train, held_out = make()
        write_jsonl(SAMPLES_DIR / BUNDLED[name], train)
        write_jsonl(SAMPLES_DIR / BUNDLED[f"{name}-eval"], held_out)
    names = ("addition", "addition-prompts", "addition-eval", "addition-train-prompts")
    for name, records in zip(names, addition_records(), strict=True):
        write_jsonl(SAMPLES_DIR / BUNDLED[name], records)
    for name, records in zip(("reviews", "reviews-prompts", "reviews-eval"), review_records(), strict=True):
        write_jsonl(SAMPLES_DIR / BUNDLED[name], records)
    for name, records in zip(("mult-prompts", "mult-eval"), multiplication_records(n_sft=0)[2:], strict=True):
        write_jsonl(SAMPLES_DIR / BUNDLED[name], records)


if __name__ == "__main__":
    main()

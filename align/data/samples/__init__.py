"""Bundled sample datasets, addressable by name wherever a dataset is expected (`--data arith`).

They are generated deterministically by this module; regenerate with `python -m align.data.samples`.

- `arith`       SFT, `messages` format: "What is 12 + 7?" -> "19" (2000 examples, operands 0-49, + and -)
- `arith-eval`  the held-out split of the same task (200 examples, disjoint from `arith`)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent
BUNDLED: dict[str, str] = {
    "arith": "arith_sft.jsonl",
    "arith-eval": "arith_sft_eval.jsonl",
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


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    train, held_out = arithmetic_sft_records()
    write_jsonl(SAMPLES_DIR / BUNDLED["arith"], train)
    write_jsonl(SAMPLES_DIR / BUNDLED["arith-eval"], held_out)


if __name__ == "__main__":
    main()

"""Regenerate the tables of docs/ADAPTERS.md from results, never by hand.

    python docs/make_adapters.py            # run tests/test_adapters_matrix.py, then render both tables
    python docs/make_adapters.py --only "kto or distill"  # rerun only the matching cells (pytest -k), keep the rest
    python docs/make_adapters.py --no-test  # render from docs/adapter_matrix.json and bench/results/adapters.json

The matrix table comes from the outcomes the matrix test records (ALIGN_MATRIX_JSON, written to
docs/adapter_matrix.json); the comparison table from bench/adapters.py's results (bench/results/adapters.json).
Each table replaces the text between its `<!-- NAME:start -->` and `<!-- NAME:end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "ADAPTERS.md"
MATRIX = ROOT / "docs" / "adapter_matrix.json"
BENCH = ROOT / "bench" / "results" / "adapters.json"
COLUMNS = [("sft", "sft"), ("merge", "align merge"), ("rm", "rm (pairs)"), ("rm-pointwise", "rm (pointwise)"),
           ("dpo-continue", "dpo --from (continue)"), ("dpo-merge", "dpo --from (merge)"),
           ("kto", "kto --from (continue)"), ("orpo", "orpo --from (continue)"), ("simpo", "simpo --from (continue)"),
           ("grpo", "grpo --from (continue)"), ("ppo", "ppo --from (continue)"), ("distill", "distill --from (continue)")]


def run_matrix_test(only: str | None) -> None:
    """Run the matrix test; its outcomes are merged into MATRIX (a full run starts from an empty file)."""
    if only is None:
        MATRIX.unlink(missing_ok=True)
    env = {**os.environ, "ALIGN_MATRIX_JSON": str(MATRIX)}
    select = ["-k", only] if only else []
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-n", "0", "tests/test_adapters_matrix.py", *select],
                           cwd=ROOT, env=env)
    if code:
        sys.exit(f"the matrix test failed (exit {code}); the table is not regenerated")


def matrix_table(outcomes: dict) -> str:
    from align.adapters import ADAPTERS

    seen = {v["kind"] for v in outcomes.values()}
    kinds = [k for k in ADAPTERS if k in seen] + sorted(seen - set(ADAPTERS))
    lines = ["| kind | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    notes: dict[str, int] = {}
    for kind in kinds:
        cells = []
        for stage, _ in COLUMNS:
            cell = outcomes.get(f"{kind}|{stage}")
            if cell is None:
                cells.append("–")
            elif cell["outcome"] == "ok":
                cells.append("✓" + (f" ({cell['detail']})" if cell["detail"] and stage != "sft" else ""))
            else:
                number = notes.setdefault(cell["detail"], len(notes) + 1)
                cells.append(f"refused [{number}]")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"[{n}] {reason}" + "  " for reason, n in notes.items()]
    return "\n".join(lines)


def bench_table(results: dict) -> str:
    head = ["kind", "lr", "trainable params", "% of base", "adapter on disk", "peak RSS", "step time", "held-out loss",
            "held-out accuracy"]
    lines = [f"Command: `{results['command']}`  ", f"Setting: {results['setting']}  ", "Machine: {cpu}, {cores} cores, torch {torch}, transformers {transformers}, trl {trl}".format(
                 **{k: results["machine"].get(k, "?") for k in ("cpu", "cores", "torch", "transformers", "trl")}),
             "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in results["rows"]:
        lines.append(
            f"| {row['kind']} | {row['lr']:g} | {row['trainable']:,} | {100 * row['trainable_fraction']:.3f} | "
            f"{row['disk_bytes'] / 1024:,.0f} KiB | {row['peak_rss_mib']:,.0f} MiB | {1000 * row['step_s']:.0f} ms | "
            f"{row['eval_loss']:.3f} | {100 * row['accuracy']:.0f}% |")
    return "\n".join(lines)


def replace(page: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(page):
        sys.exit(f"{PAGE}: no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-test", action="store_true", help="render from the stored results only")
    parser.add_argument("--only", metavar="EXPR", help="rerun only the matrix cells pytest -k EXPR selects (e.g. "
                        "'kto or distill'); the other cells keep their stored outcomes")
    args = parser.parse_args()
    if not args.no_test:
        run_matrix_test(args.only)
    page = PAGE.read_text()
    page = replace(page, "matrix", matrix_table(json.loads(MATRIX.read_text())))
    if BENCH.is_file():
        page = replace(page, "bench", bench_table(json.loads(BENCH.read_text())))
    PAGE.write_text(page)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()

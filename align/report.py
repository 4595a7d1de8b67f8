"""`align report (RUN | PIPELINE_DIR)`: PNG curves of the logged series and a summary page.

For a run: one PNG per logged series of RUN/metrics.jsonl — loss, rewards (total and per function), KL, accuracy,
learning rate, grad norm, margins, ... — named after the series (`train_loss.png`, `rewards_accuracy_mean.png`);
evaluation points (`eval_*` / `eval/*` keys) are drawn as markers on the curve of the same quantity. Then
`report.md` and a self-contained `report.html` (the PNGs embedded) with lineage, config and final metrics.
For a pipeline directory (DIR/pipeline.json): a report per stage (in DIR/<stage>/report/), and DIR/report/ with the
table base → each stage of held-out metrics, linking the stage reports.

An RL run with gold metrics (`--gold-reward`, align.stages.gold) also gets the over-optimization picture, per gold
metric G: `overoptimization_G_steps.png` (proxy = the total training reward, left axis, and gold, right axis, over
steps; held-out points as markers) and `overoptimization_G_kl.png` (proxy and gold against √KL to the parent, as in
Gao, Schulman & Hilton 2022), and the summary page says at which step gold peaked and where it ended.

Works on a run in progress (it reads what is logged so far). Matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import Config, opt
from align.errors import Problems
from align.io import output_path_problem, read_json, read_jsonl

SKIP = {"step", "epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
        "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


@dataclass
class ReportConfig(Config):
    positional = "target"
    target: str | None = opt(None, "A run directory or a pipeline output directory (holding pipeline.json).")
    output: str | None = opt(None, "Where to write the report (default: TARGET/report).", aliases=["-o"])

    def check(self, problems: Problems) -> None:
        if self.output and (problem := output_path_problem(self.output)) is not None:
            problems.add(problem)
        if not self.target:
            problems.add("Give a run or pipeline directory: align report RUN.")
        elif not Path(self.target).is_dir():
            problems.add(f"{self.target}: no such directory.")
        elif not ((Path(self.target) / "run.json").is_file() or (Path(self.target) / "pipeline.json").is_file()):
            problems.add(f"{self.target} holds neither run.json (a run) nor pipeline.json (a pipeline).")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _quantity(key: str) -> tuple[str, bool]:
    """(the series a logged key belongs to, is it an evaluation point)."""
    for prefix in ("eval_", "eval/"):
        if key.startswith(prefix):
            return key[len(prefix):], True
    return key, False


def collect_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{quantity: {"train": [(step, value)], "eval": [(step, value)]}} from metrics.jsonl records."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in records:
        step = record.get("step", 0)
        for key, value in record.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            quantity, is_eval = _quantity(key)
            series.setdefault(quantity, {"train": [], "eval": []})["eval" if is_eval else "train"].append((step, value))
    return series


# the series an ML engineer reads first, in this order (a quantity matches its first pattern); the rest follow, grouped
HEADLINE = ("loss", "loss/policy_avg", "loss/value_avg", "reward", "objective/scores", "rewards/", "gold/", "score",
            "accuracy", "mean_token_accuracy", "rewards/accuracies", "preference_accuracy", "rewards/margins", "margin",
            "kl", "objective/kl")
TAIL = ("learning_rate", "grad_norm", "entropy", "policy/", "val/", "completions/", "sampling/", "timing/")
UNITS = (("timing/", "seconds"), ("_s", "seconds"), ("kl", "nats"), ("length", "tokens"), ("num_tokens", "tokens"),
         ("entropy", "nats"), ("loss", "nats"))


def series_order(quantity: str) -> tuple[int, int, str]:
    """Sort key: headline series first (in HEADLINE's order), then the others, then the bookkeeping (TAIL's order)."""
    for i, pattern in enumerate(HEADLINE):
        if quantity == pattern or pattern.endswith("/") and quantity.startswith(pattern):
            return 0, i, quantity
    for i, pattern in enumerate(TAIL):
        if quantity == pattern or pattern.endswith("/") and quantity.startswith(pattern):
            return 2, i, quantity
    return 1, 0, quantity


def unit(quantity: str) -> str:
    name = quantity.lower()
    found = next((u for pattern, u in UNITS if pattern in name and not (pattern == "_s" and not name.endswith("_s"))), None)
    return f"{quantity} ({found})" if found else quantity


def plot_series(series: dict[str, dict[str, list[tuple[float, float]]]], out: Path, title: str) -> list[Path]:
    """One PNG per quantity, headline series first: the training curve as a line, evaluation points as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for quantity, points in sorted(series.items(), key=lambda kv: series_order(kv[0])):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if points["train"]:
            xs, ys = zip(*points["train"], strict=True)
            ax.plot(xs, ys, "-", lw=1.5, label="training", marker="." if len(xs) < 30 else None)
        if points["eval"]:
            xs, ys = zip(*points["eval"], strict=True)
            ax.plot(xs, ys, "o--", ms=6, label="held-out")
        ax.set_title(f"{title}: {quantity}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit(quantity))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if points["train"] and points["eval"]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{_slug(quantity)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# -- over-optimization: gold vs proxy ------------------------------------------------------------------------
# (training key, held-out keys, label) of the proxy and the KL, as ppo and grpo (TRL) log them
PROXY = (("objective/scores", ("eval/score",), "total training reward"), ("reward", ("eval_reward",), "total training reward"))
KL = (("objective/kl", ("eval/kl",), "KL per sequence, nats"), ("kl", ("eval_kl",), "KL per token, nats"))


def _points(records: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[int, float]]:
    """(step, value) of the first of `keys` each record holds, finite values only."""
    out = []
    for record in records:
        value = next((record[k] for k in keys if isinstance(record.get(k), (int, float))), None)
        if value is not None and not isinstance(value, bool) and math.isfinite(value):
            out.append((int(record.get("step", 0)), float(value)))
    return out


def _peak(points: list[tuple[int, float]]) -> tuple[int, float]:
    """The highest point, the first one on a tie."""
    return max(points, key=lambda p: (p[1], -p[0]))


@dataclass
class Overoptimization:
    """One gold metric's series beside the proxy's and the KL's; `held_out` says which series the peak is read from."""

    name: str
    gold: dict[str, list[tuple[int, float]]]  # {"train": ..., "eval": ...}
    proxy: dict[str, list[tuple[int, float]]]
    kl: dict[str, list[tuple[int, float]]]
    proxy_label: str
    kl_label: str

    @property
    def held_out(self) -> bool:
        return bool(self.gold["eval"])

    def peak(self) -> tuple[int, float]:
        return _peak(self.gold["eval" if self.held_out else "train"])

    def final(self) -> tuple[int, float]:
        return self.gold["eval" if self.held_out else "train"][-1]

    def summary(self) -> str:
        which = "held-out" if self.held_out else "training-rollout"
        (step, value), (last, end) = self.peak(), self.final()
        proxy = dict(self.proxy["eval" if self.held_out else "train"])
        text = f"{which} gold {self.name} peaked at step {step} ({value:.4g}); at the final step {last} it is {end:.4g}"
        if step in proxy and last in proxy:
            text += f", while the proxy ({self.proxy_label}) went {proxy[step]:.4g} → {proxy[last]:.4g}"
        return text + "."


def find_overoptimization(records: list[dict[str, Any]]) -> list[Overoptimization]:
    """The gold metrics of a run's metrics.jsonl records, each with the proxy and KL series beside it."""
    names = sorted({k[len("gold/"):-len("/mean")] for r in records for k in r
                    if k.startswith("gold/") and k.endswith("/mean")}
                   | {k[len(p) + len("gold/"):-len("/mean")] for r in records for k in r for p in ("eval/", "eval_")
                      if k.startswith(p + "gold/") and k.endswith("/mean")})
    proxy = next((p for p in PROXY if _points(records, (p[0],))), PROXY[0])
    kl = next((k for k in KL if _points(records, (k[0],))), KL[0])
    out = []
    for name in names:
        gold = {"train": _points(records, (f"gold/{name}/mean",)),
                "eval": _points(records, (f"eval/gold/{name}/mean", f"eval_gold/{name}/mean"))}
        if gold["train"] or gold["eval"]:
            out.append(Overoptimization(name, gold, {"train": _points(records, (proxy[0],)),
                                                     "eval": _points(records, proxy[1])},
                                        {"train": _points(records, (kl[0],)), "eval": _points(records, kl[1])},
                                        proxy[2], kl[2]))
    return out


def plot_overoptimization(found: list[Overoptimization], out: Path, title: str) -> list[Path]:
    """Per gold metric: gold and proxy over steps (two y axes), and against √KL to the parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    out.mkdir(parents=True, exist_ok=True)
    written = []
    proxy_color, gold_color = "#3b6ea8", "#d9731a"
    for o in found:
        peak_step, peak_value = o.peak()
        # 1. over steps
        fig, left = plt.subplots(figsize=(7.5, 4.8))
        right = left.twinx()
        lines = []
        for ax, series, color, label in ((left, o.proxy, proxy_color, f"proxy: {o.proxy_label}"),
                                         (right, o.gold, gold_color, f"gold: {o.name}")):
            if series["train"]:
                xs, ys = zip(*series["train"], strict=True)
                lines += ax.plot(xs, ys, "-", color=color, lw=1.2, alpha=0.45 if series["eval"] else 1.0,
                                 label=f"{label} (training rollouts)")
            if series["eval"]:
                xs, ys = zip(*series["eval"], strict=True)
                lines += ax.plot(xs, ys, "o-", color=color, lw=2, ms=5, label=f"{label} (held-out)")
        lines.append(right.axvline(peak_step, color=gold_color, ls=":", lw=1.2,
                                   label=f"gold peak: step {peak_step} ({peak_value:.3g})"))
        left.set_xlabel("training step")
        left.set_ylabel(f"proxy: {o.proxy_label}", color=proxy_color)
        right.set_ylabel(f"gold: {o.name}", color=gold_color)
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.grid(alpha=0.3)
        _legend_below(left, lines)
        left.set_title(f"{title}: proxy vs gold over training", fontsize=10)
        fig.tight_layout()
        path = out / f"overoptimization_{_slug(o.name)}_steps.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        # 2. against √KL: held-out points where the KL was measured on them, else the training rollouts
        split = "eval" if len(o.kl["eval"]) >= 2 and len(o.gold["eval"]) >= 2 else "train"
        kl = dict(o.kl[split])
        if not kl:
            continue
        fig, left = plt.subplots(figsize=(7.5, 4.8))
        right = left.twinx()
        lines = []
        for ax, series, color, label, marker in ((left, o.proxy, proxy_color, f"proxy: {o.proxy_label}", "s"),
                                                 (right, o.gold, gold_color, f"gold: {o.name}", "o")):
            pts = [(math.sqrt(max(kl[s], 0.0)), v, s) for s, v in series[split] if s in kl]
            if pts:  # points, not a path: the KL need not grow monotonically with the steps
                xs, ys, steps = zip(*pts, strict=True)
                lines += ax.plot(xs, ys, marker, color=color, ms=6, alpha=0.85, label=label)
                if len(pts) <= 25:
                    for x, y, step in pts:
                        ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                                    color=color)
        gold_pts = {s: v for s, v in o.gold[split]}
        if peak_step in kl and peak_step in gold_pts and split == ("eval" if o.held_out else "train"):
            x = math.sqrt(max(kl[peak_step], 0.0))
            lines += right.plot([x], [gold_pts[peak_step]], "*", color="black", ms=12,
                                label=f"gold peak (step {peak_step})")
        where = "held-out completions" if split == "eval" else "training rollouts"
        lines.append(Line2D([], [], ls="none", label="numbers: training step"))
        left.set_xlabel(f"√KL to the parent policy  ({o.kl_label}; {where})")
        left.set_ylabel(f"proxy: {o.proxy_label}", color=proxy_color)
        right.set_ylabel(f"gold: {o.name}", color=gold_color)
        left.grid(alpha=0.3)
        _legend_below(left, lines)
        left.set_title(f"{title}: proxy and gold against distance from the parent", fontsize=10)
        fig.tight_layout()
        path = out / f"overoptimization_{_slug(o.name)}_kl.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _legend_below(ax, lines: list) -> None:
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=2, frameon=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_pages(out: Path, title: str, sections: list[tuple[str, str]], images: list[Path]) -> None:
    """report.md (images linked) and report.html (images embedded, so the file stands alone)."""
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body, ""]
    if images:
        md += ["## Curves", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in images]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html_page(title, sections, images))


def _html_page(title: str, sections: list[tuple[str, str]], images: list[Path]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:49%}"
             "pre{background:#f6f6f6;padding:8px;overflow:auto}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_md_to_html(body)}")
    if images:
        parts.append("<h2>Curves</h2>")
        for path in images:
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
    """Escaped text with markdown links [text](href) as clickable links."""
    out, last = [], 0
    for m in LINK.finditer(text):
        out += [html.escape(text[last:m.start()]), f"<a href='{html.escape(m.group(2))}'>{html.escape(m.group(1))}</a>"]
        last = m.end()
    return "".join(out) + html.escape(text[last:])


def _md_to_html(body: str) -> str:
    """The little markdown these pages use: tables, fenced code, plain lines."""
    out, lines, i = [], body.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            block = "<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>"
            if line.startswith("```folded"):
                block = f"<details><summary>{html.escape(line[len('```folded'):].strip())}</summary>{block}</details>"
            out.append(block)
            i = j + 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|- "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *body_rows = rows
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body_rows)
                       + "</table>")
        else:
            if line.strip():
                out.append(f"<p>{_inline(line)}</p>")
            i += 1
    return "\n".join(out)


def run_report(run_dir: Path, out: Path) -> Path:
    """Curves and summary page of one run; returns the report directory."""
    from align.runs import Run, read_manifest

    manifest = read_manifest(run_dir)
    run = Run(run_dir)
    # a run in progress may be writing its last line: that torn line is skipped, any other bad line is an error
    records = read_jsonl(run.metrics_path, torn_tail_ok=True) if run.metrics_path.is_file() else []
    found = find_overoptimization(records)
    images = plot_overoptimization(found, out, run_dir.name) + plot_series(collect_series(records), out, run_dir.name)
    final = manifest.get("metrics") or {}
    sections = [
        ("Run", _md_table(["field", "value"], [[k, manifest[k]] for k in
                                               ("stage", "status", "adapter", "base_model", "parent", "handoff",
                                                "started_at", "ended_at") if manifest.get(k) is not None]
                          + [["lineage", lineage_text(manifest, run_dir)]])),
        *([("Over-optimization", _overoptimization_text(found, manifest.get("best")))] if found else []),
        ("Health", health_section(manifest)),
        ("Final metrics", _md_table(["metric", "value"], [[k, v] for k, v in final.items()]) if final else "none yet"),
        ("Config", config_text(manifest)),
    ]
    write_pages(out, f"{manifest.get('stage', 'run')} run {run_dir.name}", sections, images)
    return out


def lineage_text(manifest: dict[str, Any], run_dir: Path) -> str:
    """base → each ancestor run → this run (a pairs run: its policy → this run)."""
    chain = [Path(p.get("run") or p.get("path") or "?").name + (f" ({p['stage']})" if p.get("stage") else "")
             for p in manifest.get("lineage") or []]
    start = manifest.get("base_model") or (Path(manifest["parent"]).name if manifest.get("parent") else None)
    return " → ".join([*([str(start)] if start else []), *chain, run_dir.name])


def config_text(manifest: dict[str, Any]) -> str:
    """The options that differ from the stage's defaults as a table, the whole resolved config folded below."""
    config = manifest.get("config") or {}
    defaults = _defaults(manifest.get("stage"))
    changed = [[k, json.dumps(v, default=str)] for k, v in config.items()
               if k not in ("config",) and (k not in defaults or defaults[k] != v)]
    table = _md_table(["option (differs from the default)", "value"], changed) if changed else "All defaults."
    return table + "\n\n```folded full resolved config\n" + json.dumps(config, indent=2, default=str) + "\n```"


def _defaults(stage: str | None) -> dict[str, Any]:
    import dataclasses

    from align.stages import KINDS, stage_parts

    if stage not in KINDS:
        return {}
    out = {}
    for f in dataclasses.fields(stage_parts(stage)[0]):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def _overoptimization_text(found: list[Overoptimization], best: dict[str, Any] | None) -> str:
    lines = [o.summary() for o in found]
    if best:
        lines.append(f"Kept (--keep-best {best['metric']}:{best['mode']}): the policy of step {best['step']} "
                     f"({best['value']:.4g}); it is this run's adapter.")
    lines.append("Gold metrics are scored on the same completions as the proxy and never trained on; see "
                 + ", ".join(f"overoptimization_{_slug(o.name)}_steps.png / _kl.png" for o in found) + ".")
    return "\n".join(f"- {line}" for line in lines)


def health_warnings(manifest: dict[str, Any]) -> list[str]:
    """What went wrong or looks degenerate in a run: its error if it failed, and its health warnings (align.health)."""
    out = [f"WARNING: {w}." for w in (manifest.get("health") or {}).get("warnings", [])]
    if manifest.get("status") == "failed" and manifest.get("error"):
        out.insert(0, f"FAILED: {manifest['error']}")
    return out


def health_section(manifest: dict[str, Any]) -> str:
    health = manifest.get("health")
    if not health:
        return "\n".join(health_warnings(manifest)) or "not assessed (the run has not finished training)"
    rows = [[k, json.dumps(v, default=str)] for k, v in health.items() if k != "warnings"]
    lines = health_warnings(manifest) or ["No warnings."]
    return "\n".join(lines) + "\n\n" + _md_table(["check", "value"], rows)


def pipeline_report(pipeline_dir: Path, out: Path) -> Path:
    """Each stage's report plus the pipeline page with the held-out table; returns the report directory."""
    from align.pipeline import format_table
    from align.runs import read_manifest

    data = read_json(pipeline_dir / "pipeline.json", "pipeline summary")
    out.mkdir(parents=True, exist_ok=True)
    links, warnings = [], []
    for stage in data.get("stages", []):
        run_dir = Path(stage["run"])
        if (run_dir / "run.json").is_file():
            run_report(run_dir, run_dir / "report")
            links.append([stage["name"], stage["kind"], stage.get("from", "-"), stage.get("status"), _kept(stage),
                          f"[report](../{run_dir.name}/report/report.html)"])
            warnings += [f"stage '{stage['name']}': {w}" for w in health_warnings(read_manifest(run_dir))]
        else:
            links.append([stage["name"], stage["kind"], stage.get("from", "-"), stage.get("status", "pending"), "-",
                          "-"])
    rows = data.get("table", [])
    header = ["stage", "kind", "from", "held-out accuracy", "mean reward", "KL to parent", "preference accuracy"]
    metrics = ["accuracy", "reward", "kl", "preference_accuracy"]
    if any("accuracy_without_tools" in r for r in rows):  # eval: {without_tools: true}
        header, metrics = [*header, "accuracy without tools"], [*metrics, "accuracy_without_tools"]

    def cell(row: dict[str, Any], metric: str) -> str:
        value = row.get(metric)
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if "accuracy" in metric else f"{value:.3f}"

    table = _md_table(header, [[r["stage"], r["kind"], r["from"]] + [cell(r, m) for m in metrics] for r in rows])
    evaluation = data.get("eval") or {}
    sections = [
        ("Held-out metrics, base → each stage", table + f"\n\nHeld-out data: {evaluation.get('data', '-')} "
                                                       f"({evaluation.get('max_samples', 'all')} samples)."),
        ("Stages", _md_table(["stage", "kind", "from", "status", "handed on (--keep-best)", "report"], links)),
        ("Health", "\n".join(warnings) or "No warnings."),
        ("Pipeline", _md_table(["field", "value"], [[k, data.get(k)] for k in ("pipeline", "status", "model",
                                                                               "output", "seed")])),
    ]
    images = _stage_bars(rows, out, [str(r) for r in evaluation.get("reward") or []])
    write_pages(out, f"pipeline {pipeline_dir.name}", sections, images)
    (out / "table.txt").write_text(format_table(rows) + "\n")
    return out


def _kept(stage: dict[str, Any]) -> str:
    best = stage.get("best")
    return f"step {best['step']} ({best['metric']} = {best['value']:.4g})" if best else "last step"


def _stage_bars(rows: list[dict[str, Any]], out: Path, rewards: list[str]) -> list[Path]:
    """One figure: each policy's held-out metric, base → each stage (task accuracy when the eval data has answers,
    else the mean of the eval block's rewards, as in the table), each bar labelled with the stage it started from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "reward"
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        return []
    scale, unit = (100, "%") if metric == "accuracy" else (1, "")
    values = [scale * r[metric] for r in scored]
    label = "held-out accuracy (%)" if metric == "accuracy" else f"held-out mean reward ({', '.join(rewards) or '-'})"
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(scored)), 3.8))
    ax.bar(range(len(scored)), values, color="#4a7ab5")
    ax.set_xticks(range(len(scored)), [r["stage"] if r["from"] in ("-", None) else f"{r['stage']}\n← {r['from']}"
                                       for r in scored], fontsize=8)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.1f}{unit}" if unit else f"{v:.3g}", (i, v), xytext=(0, 2), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(f"{label}: base → each stage", fontsize=10)
    if metric == "accuracy":
        ax.set_ylim(0, 105)
    fig.tight_layout()
    path = out / ("held_out_accuracy.png" if metric == "accuracy" else "held_out_reward.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def main(cfg: ReportConfig) -> str:
    cfg.validate()
    target = Path(cfg.target)
    out = Path(cfg.output) if cfg.output else target / "report"
    if (target / "pipeline.json").is_file():
        path = pipeline_report(target, out)
        return str(path / "report.html")
    path = run_report(target, out)
    from align.runs import read_manifest

    return "\n".join([str(path / "report.html"), *health_warnings(read_manifest(target))])

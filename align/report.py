"""`align report (RUN | PIPELINE_DIR)`: PNG curves of the logged series and a summary page.

For a run: one PNG per logged series of RUN/metrics.jsonl — loss, rewards (total and per function), KL, accuracy,
learning rate, grad norm, margins, ... — named after the series (`train_loss.png`, `rewards_accuracy_mean.png`);
evaluation points (`eval_*` / `eval/*` keys) are drawn as markers on the curve of the same quantity. Then
`report.md` and a self-contained `report.html` (the PNGs embedded) with lineage, config and final metrics.
For a pipeline directory (DIR/pipeline.json): a report per stage (in DIR/<stage>/report/), and DIR/report/ with the
table base → each stage of held-out metrics, linking the stage reports.

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


def plot_series(series: dict[str, dict[str, list[tuple[float, float]]]], out: Path, title: str) -> list[Path]:
    """One PNG per quantity: the training curve as a line, evaluation points as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for quantity, points in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if points["train"]:
            xs, ys = zip(*points["train"], strict=True)
            ax.plot(xs, ys, "-", lw=1.5, label="train", marker="." if len(xs) < 30 else None)
        if points["eval"]:
            xs, ys = zip(*points["eval"], strict=True)
            ax.plot(xs, ys, "o--", ms=6, label="eval")
        ax.set_title(f"{title}: {quantity}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{_slug(quantity)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


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


def _md_to_html(body: str) -> str:
    """The little markdown these pages use: tables, fenced code, plain lines."""
    out, lines, i = [], body.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|- "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *body_rows = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body_rows)
                       + "</table>")
        else:
            if line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
            i += 1
    return "\n".join(out)


def run_report(run_dir: Path, out: Path) -> Path:
    """Curves and summary page of one run; returns the report directory."""
    from align.runs import Run, read_manifest

    manifest = read_manifest(run_dir)
    run = Run(run_dir)
    # a run in progress may be writing its last line: that torn line is skipped, any other bad line is an error
    records = read_jsonl(run.metrics_path, torn_tail_ok=True) if run.metrics_path.is_file() else []
    images = plot_series(collect_series(records), out, run_dir.name)
    lineage = manifest.get("lineage") or []
    chain = " → ".join([str(manifest.get("base_model"))] + [Path(p.get("path", "?")).name for p in lineage]
                       + [run_dir.name])
    final = manifest.get("metrics") or {}
    sections = [
        ("Run", _md_table(["field", "value"], [[k, manifest.get(k)] for k in
                                               ("stage", "status", "adapter", "base_model", "parent", "handoff",
                                                "started_at", "ended_at")] + [["lineage", chain]])),
        ("Health", health_section(manifest)),
        ("Final metrics", _md_table(["metric", "value"], [[k, v] for k, v in final.items()]) if final else "none yet"),
        ("Config", "```\n" + json.dumps(manifest.get("config", {}), indent=2) + "\n```"),
    ]
    write_pages(out, f"{manifest.get('stage', 'run')} run {run_dir.name}", sections, images)
    return out


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
            links.append([stage["name"], stage["kind"], stage.get("from", "-"), stage.get("status"),
                          f"../{run_dir.name}/report/report.html"])
            warnings += [f"stage '{stage['name']}': {w}" for w in health_warnings(read_manifest(run_dir))]
        else:
            links.append([stage["name"], stage["kind"], stage.get("from", "-"), stage.get("status", "pending"), "-"])
    rows = data.get("table", [])
    header = ["stage", "kind", "from", "held-out accuracy", "mean reward", "KL to parent", "preference accuracy"]
    def cell(row: dict[str, Any], metric: str) -> str:
        value = row.get(metric)
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if metric in ("accuracy", "preference_accuracy") else f"{value:.3f}"

    table = _md_table(header, [[r["stage"], r["kind"], r["from"]] + [
        cell(r, m) for m in ("accuracy", "reward", "kl", "preference_accuracy")] for r in rows])
    evaluation = data.get("eval") or {}
    sections = [
        ("Held-out metrics, base → each stage", table + f"\n\nHeld-out data: {evaluation.get('data', '-')} "
                                                       f"({evaluation.get('max_samples', 'all')} samples)."),
        ("Stages", _md_table(["stage", "kind", "from", "status", "report"], links)),
        ("Health", "\n".join(warnings) or "No warnings."),
        ("Pipeline", _md_table(["field", "value"], [[k, data.get(k)] for k in ("pipeline", "status", "model",
                                                                               "output", "seed")])),
    ]
    # one figure: held-out accuracy per stage
    images = _stage_bars(rows, out)
    write_pages(out, f"pipeline {pipeline_dir.name}", sections, images)
    (out / "table.txt").write_text(format_table(rows) + "\n")
    return out


def _stage_bars(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("accuracy") is not None]
    if not scored:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([r["stage"] for r in scored], [100 * r["accuracy"] for r in scored], color="#4a7ab5")
    for i, r in enumerate(scored):
        ax.text(i, 100 * r["accuracy"] + 1, f"{100 * r['accuracy']:.1f}%", ha="center", fontsize=8)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("held-out accuracy: base → each stage", fontsize=10)
    ax.set_ylim(0, 105)
    fig.tight_layout()
    path = out / "held_out_accuracy.png"
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

"""What leaves align loads with plain transformers + PEFT (and vLLM) to the outputs align computes.

**A run on a merged parent keeps its base.** A child trained with `--handoff merge` from an adapter run (ppo's
default; `align rm --from` always) trains on the original base with the parent chain's adapters merged in — weights
that exist in no model directory. Such a run writes them to RUN/base/ (a plain HF model directory: full precision,
or 4-bit nf4 for a QLoRA child, as it was trained; for a reward model the sequence-classification model with the
run's pad token) and its adapter_config.json names RUN/base as `base_model_name_or_path`. So the usual

    base = AutoModelFor...from_pretrained(PeftConfig.from_pretrained(RUN/adapter).base_model_name_or_path)
    model = PeftModel.from_pretrained(base, RUN/adapter)

computes what align computes (tests/test_export.py checks every stage kind and hand-off). Disk cost: one copy of the
base's weights per such run. Runs whose base is a model directory already (a first stage, `--handoff continue`, a
fully fine-tuned parent) add nothing. A chain holding a bitfit/bottleneck adapter (align's own format, merged in
memory) has no plain-PEFT form: `align export --merged` or the run itself (`--from`, generate, eval).

**`align export RUN -o DIR [--merged]`** writes a self-contained directory for `from_pretrained`, vLLM and other
servers: weights, tokenizer with its chat template, generation config (the tokenizer's EOS and pad). `--merged`
merges the adapter into the base (`align merge`): one plain model directory. Without it, DIR holds the adapter and
DIR/base/ its base, and the adapter names DIR/base.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems

BASE = "base"


def needs_own_base(manifest: dict[str, Any]) -> bool:
    """Whether a run's base is a merged chain that no model directory holds."""
    from align.native_adapters import is_native_dir

    merged = manifest.get("merged_adapters") or []
    return manifest.get("adapter") != "full" and bool(merged) and not any(is_native_dir(a) for a in merged)


def write_base(run_dir: Path, manifest: dict[str, Any], *, task: str, pad_token_id: int | None,
               trust_remote_code: bool = False) -> None:
    """For a run trained on a merged chain (see the module docstring): save that base to RUN/base (write, then rename)
    and point RUN/adapter/adapter_config.json at it. Call after the adapter is saved; the main process only."""
    if not needs_own_base(manifest):
        return
    from align.handoff import materialize_base

    final, tmp = run_dir / BASE, run_dir / f".{BASE}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    from align.handoff import head_count

    model = materialize_base(manifest["base_model"], manifest["merged_adapters"], task=task, num_labels=head_count(manifest),
                             quantize_4bit=bool(manifest.get("quantized_4bit")), trust_remote_code=trust_remote_code)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    model.save_pretrained(tmp)
    del model
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    point_adapter_at(run_dir / "adapter", final)


def point_adapter_at(adapter_dir: Path, base_dir: Path) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    tmp = config_path.with_name(".adapter_config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)


@dataclass
class ExportConfig(RemoteCodeOption, Config):
    positional = "run"
    run: str | None = opt(None, "Run directory to export (the --output of a finished stage).")
    output: str | None = opt(None, "Directory to write: a self-contained model for from_pretrained / vLLM.",
                             aliases=["-o"])
    merged: bool = opt(False, "Merge the adapter into the base: one plain model directory (default: the adapter "
                              "with its base in OUTPUT/base).")
    overwrite: bool = opt(False, "Replace an existing output directory (never the run itself).")

    def check(self, problems: Problems) -> None:
        if not self.run:
            problems.add("Give the run to export: align export RUN --output DIR.")
        elif not Path(self.run).is_dir():
            problems.add(f"{self.run}: no such directory. Give a run directory (the --output of a finished stage).")
        if not self.output:
            problems.add("--output is required: the directory to write.")
            return
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            problems.add(f"--output {out} is a file. Choose a directory path.")
        elif self.run and Path(self.run).is_dir() and _overlaps(out, Path(self.run)):
            problems.add(f"--output {out} is, holds or lies inside the run {self.run} being exported; a finished run "
                         "is never modified. Choose a directory outside it.")
        elif out.is_dir() and any(out.iterdir()) and not self.overwrite:
            problems.add(f"--output {out} exists and is not empty; pass --overwrite or choose another path.")


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def export(run: str | Path, output: str | Path, *, merged: bool = False, trust_remote_code: bool = False) -> Path:
    from align.handoff import head_count, materialize_base, resolve_parent
    from align.merge import merge

    run, output = Path(run), Path(output)
    parent = resolve_parent(run, child_stage="export")
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if merged or parent.full:
        merge(run, tmp, trust_remote_code=trust_remote_code)
    else:
        from align.native_adapters import is_native_dir

        if is_native_dir(parent.weights_dir) or not needs_own_base(parent.manifest) and parent.merged_adapters:
            raise AlignError(f"{run}: its '{parent.adapter}' adapter (or one merged below it) is align's own format, "
                             "which plain PEFT cannot load. Use --merged.")
        shutil.copytree(parent.weights_dir, tmp)
        own_base = run / BASE
        if own_base.is_dir():
            shutil.copytree(own_base, tmp / BASE)
        else:
            task = parent.manifest.get("task", "causal-lm")
            materialize_base(parent.base_model, [], task=task, quantize_4bit=parent.quantized_4bit,
                             num_labels=head_count(parent.manifest), trust_remote_code=trust_remote_code,
                             ).save_pretrained(tmp / BASE)
    _write_generation_config(tmp, tmp if merged or parent.full else tmp / BASE)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    if not (merged or parent.full):
        point_adapter_at(output, output / BASE)
    return output


def _write_generation_config(tokenizer_dir: Path, model_dir: Path) -> None:
    """generation_config.json beside the weights: the base's, with the tokenizer's EOS and pad tokens."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        config = GenerationConfig()
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.save_pretrained(model_dir)


def main(cfg: ExportConfig) -> Path:
    cfg.validate()
    return export(cfg.run, cfg.output, merged=cfg.merged, trust_remote_code=cfg.trust_remote_code)

"""`align merge RUN --output DIR`: the run's adapter merged into its base, written as a plain HF model
directory (loads with transformers alone). A QLoRA run is merged into the full-precision base (the 4-bit
base's dequantised values are not used), so the merged model matches the adapter applied to the original
weights. Prompt-learning adapters (prompt, prefix, ptuning) cannot be merged; full fine-tuning runs are copied. A bitfit
adapter merges when it added no bias (the biases are then ordinary weights of the model); a bitfit adapter that
added biases, and a bottleneck adapter, are refused (a plain model directory cannot hold them; the run itself
loads with `--from`, `align generate` and `align eval`).

The output is written by one process at a time (its writer lock, align.integrity), and may never be, contain or lie
inside the run, its base model or an adapter merged into it — with or without --overwrite. The run's weights are
verified before they are read (align.handoff.resolve_parent).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from align.config import Config, RemoteCodeOption, opt
from align.errors import AlignError, Problems
from align.io import output_path_problem


@dataclass
class MergeConfig(RemoteCodeOption, Config):
    positional = "run"
    run: str | None = opt(None, "Run directory to merge.")
    output: str | None = opt(None, "Directory for the merged model.", aliases=["-o"])
    overwrite: bool = opt(False, "Replace an existing output directory.")

    def check(self, problems: Problems) -> None:
        if not self.run:
            problems.add("Give the run to merge: align merge RUN --output DIR.")
        elif not Path(self.run).is_dir():
            problems.add(f"{self.run}: no such directory. Give a run directory (the --output of a finished stage).")
        if not self.output:
            problems.add("--output is required: the directory for the merged model.")
            return
        from align.integrity import check_not_source, command_inputs

        try:
            check_not_source(self.output, command_inputs(self))
        except AlignError as e:
            problems.add_error(e)
            return
        if (problem := output_path_problem(self.output)) is not None:
            problems.add(problem)
        elif Path(self.output).exists() and any(Path(self.output).iterdir()) and not self.overwrite:
            problems.add(f"--output {self.output} exists and is not empty; pass --overwrite or choose another path.")


def merge(run: str | Path, output: str | Path, trust_remote_code: bool = False) -> Path:
    from align.adapters import ADAPTERS
    from align.handoff import load_run_policy, resolve_parent

    run, output = Path(run), Path(output)
    parent = resolve_parent(run, child_stage="merge")
    if not parent.full and ADAPTERS[parent.adapter].prompt_learning:
        raise AlignError(f"{run}: a '{parent.adapter}' adapter adds virtual tokens and cannot be merged into the "
                         "base. Use the run directly (align generate RUN) or train a weight adapter such as lora.")
    from align.native_adapters import is_native_dir, merge_problem

    problem = merge_problem(parent.weights_dir) if not parent.full and is_native_dir(parent.weights_dir) else None
    if problem:
        raise AlignError(f"{run}: its '{parent.adapter}' adapter cannot be merged: {problem}. Use the run directly "
                         "(align generate / eval RUN, --from RUN), or train a PEFT adapter such as lora.")
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if parent.full:
        shutil.copytree(parent.weights_dir, tmp)
    else:
        model, tokenizer, _ = load_run_policy(run, dequantize=True, trust_remote_code=trust_remote_code)
        merged = model.merge_and_unload() if hasattr(model, "peft_config") else model
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output


def main(cfg: MergeConfig) -> Path:
    from align.integrity import lock

    cfg.validate()
    lock(cfg.output, f"--output {cfg.output}")
    cfg.validate()  # again, under the lock: another merge may have written the output meanwhile
    return merge(cfg.run, cfg.output, cfg.trust_remote_code)

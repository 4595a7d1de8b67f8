"""The trainer lifecycle shared by every stage: validate -> open the run -> load -> train -> save.

A stage supplies its config, its data preparation and its TRL trainer; everything else (run directory rules,
resume, seeds, TRL arguments common to all trainers, metrics.jsonl, TensorBoard, atomic artifacts, the
manifest) happens here, once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError, Problems
from align.launch import wait_for_everyone
from align.runs import Run

logger = logging.getLogger(__name__)


@dataclass
class Started:
    """A validated stage whose run directory is claimed and whose starting policy is loaded."""

    run: Run
    resume_from: Path | None
    policy: Any
    train: list
    evaluation: list | None
    datasets: dict[str, Any]


def start_stage(cfg, stage: str, load_data, **policy_kwargs) -> Started:
    """Validate config, data and parent (every problem at once, before any model loads), then claim the run
    directory (clear with --overwrite, find the checkpoint with --resume), seed, and build the policy."""
    from align.handoff import build_policy
    from align.models import check_vocabulary, fit_positions

    run, data = validate_stage(cfg, stage, load_data)
    seed_everything(cfg.seed)
    # the policy first: what only loading can check (e.g. --target-modules the model lacks) fails before
    # --overwrite removes the old run
    policy = build_policy(cfg, stage=stage, **policy_kwargs)
    fitted = fit_positions(cfg, policy.model)  # a default beyond the model's positions is lowered, not refused
    if fitted:
        policy.manifest["fitted_defaults"] = fitted
    check_vocabulary(policy.model, policy.tokenizer)
    resume_from = start_run(run, cfg)
    wait_for_everyone()  # launched processes: the main process has cleared (--overwrite) or checked the run directory
    return Started(run, resume_from, policy, *data)


def launch_or_join(cfg, stage: str, load_data) -> Path | None:
    """Call first in a stage's `main`. In a launched worker: record the number of processes and return None (train
    here). Asked to scale out: validate everything once, launch the workers, wait, and return the run directory they
    wrote. Otherwise None (train in this process)."""
    from align.launch import SCRATCH_PREFIX, launched, needs_launch, run, world_size

    if launched():
        if cfg.num_processes is None and world_size() > 1:  # recorded in run.json (a mismatch is refused)
            cfg.num_processes = world_size()
        if cfg.config and Path(cfg.config).parent.name.startswith(SCRATCH_PREFIX):
            cfg.config = None  # the launcher's copy of a Python-API / pipeline config: every option is recorded itself
        return None
    if not needs_launch(cfg):
        return None
    validate_stage(cfg, stage, load_data)  # every problem once, here, before any process starts
    run(stage, cfg)
    return Path(cfg.output)


def validate_stage(cfg, stage: str, load_data) -> tuple[Run, Any]:
    """Config, output directory, data and parent checked together (one AlignError listing every problem);
    returns the run (nothing written yet) and what `load_data(cfg)` returned."""
    problems: Problems = cfg.problems()
    run = open_run(cfg, problems)
    data = collect(problems, load_data, cfg) if cfg.data else None
    collect(problems, check_parent, cfg, stage)
    problems.raise_if_any(f"Cannot start `align {stage}`:")
    return run, data


def finish_stage(started: Started, cfg, *, stage: str, task: str, make_trainer, **manifest: Any) -> Path:
    """Build the TRL trainer (`make_trainer(callbacks)`), train, save, and complete the run manifest."""
    from align.adapters import ADAPTERS
    from align.export import write_base

    run, policy = started.run, started.policy
    trackers = stage_trackers(run, cfg)
    best = keeper(cfg, run, started.resume_from, "model" if ADAPTERS[policy.adapter].full else "adapter")
    with exact_adapter_precision(policy.model), one_trainable_adalora(policy.model):
        trainer = make_trainer([metrics_file(run), trackers.callback()] + adapter_callbacks(policy)
                               + best_callbacks(best, policy.tokenizer))
    adapt_trainer(trainer, policy, cfg)
    check_not_empty(trainer, cfg, run)
    if stage in ("dpo", "kto", "orpo", "simpo", "grpo"):
        from align.models import disable_dropout

        # after TRL added its "ref" adapter: PEFT's per-adapter dropouts (LoHa/LoKr module dropout, BOFT's
        # multiplicative dropout, the ref copy's LoRA dropout) are off too, so the policy equals its reference at step 1
        disable_dropout(policy.model)
    from align import health

    start = health.weight_summary(policy.model)
    with run.lifecycle(**stage_manifest(stage, task, cfg, policy, started.datasets), **manifest), trackers:
        metrics = train_and_save(trainer, run, resume_from=started.resume_from, tokenizer=policy.tokenizer,
                                 full=ADAPTERS[policy.adapter].full, best=best, start_weights=start, lr=cfg.lr)
        if run.writer:  # a merged parent chain: the run keeps that base, for plain PEFT (align.export)
            write_base(run.path, {**policy.manifest, "adapter": policy.adapter, "quantized_4bit": policy.quantized_4bit},
                       task=task, pad_token_id=policy.model.config.pad_token_id, trust_remote_code=cfg.trust_remote_code)
        run.update_manifest(metrics=metrics, **({"best": best.describe()} if best else {}))
        health.record(run, cfg, stage, started.train, start, health.weight_summary(policy.model))
    if best:
        best.discard()
    return run.path


def keeper(cfg, run: Run, resume_from: Path | None, artifact: str):
    """--keep-best's Keeper (align.stages.best), or None."""
    from align.stages.best import Keeper

    if not getattr(cfg, "keep_best", None):
        return None
    return Keeper(run, cfg.keep_best, artifact, resume_step=int(resume_from.name.split("-")[-1]) if resume_from else None)


def best_callbacks(best, tokenizer) -> list:
    from align.stages.best import callback

    return [callback(best, tokenizer)] if best is not None else []


def check_not_empty(trainer, cfg, run: Run) -> None:
    """TRL's preparation may drop every example (e.g. pairs longer than --max-length); say so, before training (and
    remove what the trainer made there — checkpoints/, logs/ — so the corrected command can use the same --output)."""
    try:
        size = len(trainer.train_dataset)
    except TypeError:  # an iterable dataset has no length
        return
    if size == 0:
        if run.writer and run.path.is_dir() and not run.manifest_path.exists():
            # no run.json: the directory was empty (or new) when the run was opened, so all of it is the trainer's
            import shutil

            for child in run.path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise AlignError(f"No training example is left after preparing the data for the trainer (--max-length "
                         f"{getattr(cfg, 'max_length', '?')}: examples that do not fit are dropped or cut to nothing). "
                         "Raise --max-length, or check the data.")


def adapter_callbacks(policy) -> list:
    """AdaLoRA's rank allocation after every optimizer step (a fresh adapter; a continued one keeps its ranks)."""
    from peft import AdaLoraConfig
    from transformers import TrainerCallback

    config = getattr(policy.model, "peft_config", {}).get("default")
    if not isinstance(config, AdaLoraConfig) or policy.manifest.get("handoff") == "continue":
        return []

    class AdaLoraAllocation(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            policy.model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraAllocation()]


@contextmanager
def one_trainable_adalora(model) -> Iterator[None]:
    """AdaLoRA allows one adapter not in inference mode, and TRL's DPO/GRPO add their frozen "ref" copy with the
    trained adapter's own config: mark that config as inference mode while the trainer is built (the trained
    adapter's weights stay trainable; AdaLoRA's rank allocation uses the adapter it recorded as trainable)."""
    config = getattr(model, "peft_config", {}).get("default")
    if type(config).__name__ != "AdaLoraConfig" or config.inference_mode:
        yield
        return
    config.inference_mode = True
    try:
        yield
    finally:
        config.inference_mode = False


def sync_reference_adapter(model) -> None:
    """Make TRL's frozen "ref" adapter an exact copy of the starting "default" adapter. TRL copies only parameters
    named `.default.` and of the same shape; LoHa/LoKr/IA3/BOFT/AdaLoRA keep theirs in ParameterDicts
    (`hada_w1_a.default`, `boft_R.default`, `lora_E.default`), VeRA/BOFT hold buffers, and a loaded AdaLoRA adapter
    is pruned to its rank pattern while the copy is not: TRL's reference would be a fresh adapter, not the parent."""
    import torch

    from align.models import is_adapter_weight

    if "ref" not in getattr(model, "peft_config", {}):
        return
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in tensors.items():
            if is_adapter_weight(name, "default"):
                ref = name.replace(".default.", ".ref.") if ".default." in name else name[: -len("default")] + "ref"
                if ref in tensors:  # AdaLoRA's loaded adapter is resized to its rank pattern, its "ref" copy is not
                    tensors[ref].data = value.detach().clone()


def adapt_trainer(trainer, policy, cfg) -> None:
    """What a kind needs from a TRL trainer after it is built: LoRA+'s optimizer; and for a policy that is not a
    PEFT model (full, bitfit, bottleneck) a reference that is a frozen copy of the starting policy — TRL would
    reload the bare model from its config path, which is not the parent when adapters were merged in or added."""
    from align.adapters import make_optimizer
    from align.native_adapters import frozen_copy

    sync_reference_adapter(policy.model)
    optimizer = make_optimizer(policy.adapter, policy.model, cfg)
    if optimizer is not None:
        trainer.optimizer = optimizer
    if getattr(trainer, "ref_model", None) is not None and not hasattr(policy.model, "peft_config"):
        trainer.ref_model = trainer.accelerator.prepare_model(frozen_copy(policy.model), evaluation_mode=True)


def as_dataset(rows: list | None):
    """A datasets.Dataset of `rows` for a TRL trainer. Preference and unpaired rows with a `tools` column (tool-calling
    conversations, e.g. from `align pairs --tool`) go in with `tools` as a JSON string, which TRL's DPO, KTO and
    Reward trainers parse back per row; Arrow would otherwise merge every row's schemas into one struct. Tool-call
    arguments stay structs: rows whose calls take different argument names would come back with each other's names
    (as nulls) and render differently, so those are refused."""
    import datasets

    if rows is None:
        return None
    if not any("tools" in r and ("chosen" in r or "completion" in r) for r in rows):
        return datasets.Dataset.from_list(rows)
    import json

    encoded = [{**r, "tools": json.dumps(r["tools"])} if "tools" in r else r for r in rows]
    fix = ("so the chat template would render other tokens than the data holds. Train on rows that call tools with "
           "the same argument names and types, or split the data by tool.")
    try:
        dataset = datasets.Dataset.from_list(encoded)
    except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError: one argument, several types
        raise AlignError(f"The rows' tool calls do not fit one datasets table ({e}), {fix}") from None
    for i, (row, back) in enumerate(zip(encoded, dataset, strict=True)):
        if _tool_calls(back) != _tool_calls(row):
            raise AlignError(f"Row {i + 1}: its tool calls do not pass through a datasets table unchanged (rows whose "
                             f"tool calls take different argument names get each other's names as nulls), {fix}")
    return dataset


def _tool_calls(row: dict) -> list:
    """Every tool call of a row's conversations, as the chat template renders it (name and arguments)."""
    return [call["function"] for key in ("prompt", "chosen", "rejected", "completion") for m in row.get(key) or []
            if isinstance(m, dict) for call in m.get("tool_calls") or []]


def open_run(cfg, problems: Problems) -> Run | None:
    """Check the output directory rules and take its writer lock; problems are collected, not raised."""
    if not cfg.output:
        return None
    try:
        from align.integrity import command_inputs

        return Run.open(cfg.output, resume=cfg.resume, overwrite=cfg.overwrite, inputs=command_inputs(cfg))
    except AlignError as e:
        problems.add_error(e)
        return None


def collect(problems: Problems, fn, *args, **kwargs):
    """Run `fn`, turning an AlignError into a collected problem (returns None then)."""
    try:
        return fn(*args, **kwargs)
    except AlignError as e:
        problems.add_error(e)
        return None


def check_parent(cfg, stage: str) -> None:
    """Validate --from (if given) and the adapter kind for this stage and hand-off, so these problems are reported
    with the config and data problems."""
    from align.handoff import check_adapter, resolve_parent

    if hasattr(cfg, "adapter"):
        check_adapter(cfg, stage, task="seq-cls" if stage == "rm" else "causal-lm")
    elif cfg.from_run:
        resolve_parent(cfg.from_run, stage, cfg.model)


# Options a resumed run may change (recorded in run.json `resume_changes` with the step); any other change is refused.
RESUME_MAY_CHANGE = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "tensorboard", "report_to", "resume", "overwrite", "config", "strict"}


def config_changes(previous: dict[str, Any], cfg) -> dict[str, tuple[Any, Any]]:
    """{option: (recorded value, value in `cfg`)} for every option whose value differs from a run's recorded config
    (a path spelled another way — relative or absolute, `./x` or `x` — that names the same file is no change)."""
    import json

    current = json.loads(json.dumps(cfg.to_dict(), default=str))
    return {k: (previous.get(k), current.get(k)) for k in sorted(set(previous) | set(current))
            if not _same_value(previous.get(k), current.get(k))}


def _same_value(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_value(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, str) and isinstance(new, str) and old and new:
        try:
            return os.path.samefile(old, new)
        except (OSError, ValueError):  # not both existing paths
            return False
    return False


def start_run(run: Run, cfg) -> Path | None:
    """Clear (overwrite) or check (resume) the run directory; return the checkpoint to resume from."""
    if cfg.overwrite:
        run.clear()
    if not cfg.resume:
        return None
    manifest = run.manifest()
    changed = config_changes(manifest.get("config", {}), cfg)
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        raise AlignError(
            f"--resume: {run.path} was started with other options: " + ", ".join(
                f"--{k.replace('_', '-')} {old!r} (now {new!r})" for k, (old, new) in refused.items())
            + ". Resume with the same options (only " + ", ".join(
                f"--{k.replace('_', '-')}" for k in sorted(RESUME_MAY_CHANGE - {"resume", "overwrite", "config"}))
            + " may change), or use --overwrite to start over."
        )
    check_base(manifest, run.path)
    checkpoint = run.last_checkpoint(strict=True)
    step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    recorded = {k: list(v) for k, v in changed.items() if k not in ("resume", "overwrite", "config")}
    if recorded:
        run.update_manifest(resume_changes=[*manifest.get("resume_changes", []), {"at_step": step, **recorded}])
    run.truncate_metrics(after_step=step)
    logger.info("Resuming %s from %s", run.path, checkpoint or "the start (no checkpoint yet)")
    return checkpoint


def check_base(manifest: dict[str, Any], run_path: Path) -> None:
    """--resume: the base model's weights must still be the ones the run started from."""
    from align.handoff import base_problems

    problems = base_problems(manifest)
    if problems:
        raise AlignError(f"--resume: the base model {manifest.get('base_model')} of {run_path} changed since the run "
                         f"started ({'; '.join(problems)}). Restore that base, or start over with --overwrite.")


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def trainer_arguments(cfg, run: Run, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields common to every TRL config, from align's TrainOptions."""
    import torch


    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() and cfg.dtype in ("auto", "bfloat16")
    return dict(
        output_dir=str(run.checkpoints_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        **({"optim": cfg.full_optimizer} if getattr(cfg, "full_optimizer", "adamw") != "adamw" else {}),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_on_start=has_eval and not (cfg.resume and run.last_checkpoint()),  # a resumed run has logged it
        eval_steps=cfg.eval_steps or cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=not cuda,
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",  # align's own trackers (align.trackers), the same for every stage
        disable_tqdm=False,
        dataloader_pin_memory=cuda,
    )


def metrics_file(run: Run):
    """A TrainerCallback writing every log of the Trainer to RUN/metrics.jsonl (main process)."""
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                run.log_metrics({"step": state.global_step, "epoch": state.epoch, **logs})

    return MetricsFile()


def stage_trackers(run: Run, cfg):
    """The run's trackers (align.trackers: TensorBoard in RUN/logs unless --no-tensorboard, and --report-to's
    others), opened on the main process only; a context manager that closes them."""
    from align.trackers import Trackers

    return Trackers(cfg.report_to if run.writer else [], run.path.name, str(run.path), cfg.to_dict(),
                    tensorboard=cfg.tensorboard)


@contextmanager
def exact_adapter_precision(model) -> Iterator[None]:
    """Undo TRL's bf16 cast of a 4-bit model's trainable adapter when the base computes in float32.

    TRL's trainers cast QLoRA adapters to bf16 in __init__ (the QLoRA paper's GPU recipe). With float32
    compute (CPU) that only rounds the adapter — a child would no longer start exactly at its parent, and DPO's
    policy would differ from its frozen "ref" copy at step 0 — so around trainer construction the trainable
    weights are saved and put back, in float32. GPU (bf16 compute) keeps TRL's behaviour.
    """
    import torch

    compute = getattr(getattr(model.config, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    if not getattr(model, "is_loaded_in_4bit", False) or compute not in (torch.float32, "float32"):
        yield
        return
    saved = {name: p.data.clone() for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in saved:
            param.data = saved[name]


def train_and_save(trainer, run: Run, *, resume_from: Path | None, tokenizer, full: bool, best=None,
                   start_weights: dict[str, Any] | None = None, lr: float | None = None) -> dict[str, Any]:
    """Train (resuming if asked), evaluate, and write the policy atomically — with --keep-best (`best`, an
    align.stages.best.Keeper) the best evaluation step's policy instead of the last. Returns the final metrics.
    Weights that diverged (NaN/inf, exploded; align.health) fail the run before anything is written."""
    from align.health import check_weights
    from align.interrupt import GracefulStop

    if resume_from is not None:
        load_trained_adapter(trainer.accelerator.unwrap_model(trainer.model), resume_from)
    seal_checkpoints(trainer)
    stop = GracefulStop()
    trainer.add_callback(stop.callback())
    with stop:  # SIGINT/SIGTERM: finish the step, save a checkpoint, stop (align.interrupt)
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    stop.raise_if_stopped(trainer.state.global_step, run.last_checkpoint())
    check_weights(trainer.accelerator.unwrap_model(trainer.model), start_weights, lr, run=run)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if best is not None:
        best.finish()  # AlignError if the metric was never logged: before any policy is written
    from accelerate.utils import DistributedType

    from align.models import save_policy

    accelerator = trainer.accelerator
    # sharded weights (FSDP, DeepSpeed ZeRO) are gathered by every process; only the main process writes
    state_dict = accelerator.get_state_dict(trainer.model) if accelerator.distributed_type in (
        DistributedType.FSDP, DistributedType.DEEPSPEED) else None
    if accelerator.is_main_process:
        with run.artifact("model" if full else "adapter") as tmp:
            if best is not None:
                best.install(tmp)
            else:
                save_policy(accelerator.unwrap_model(trainer.model), tokenizer, tmp, state_dict=state_dict)
    return metrics


def seal_checkpoints(trainer) -> None:
    """Make every checkpoint the Trainer saves count only once sealed (align.integrity.seal): after all its files are
    written (every process's, e.g. grpo's buffers), the main process seals it, and only then are old checkpoints
    rotated out (transformers rotates before its on_save callbacks, which would leave no sealed checkpoint to fall back
    on with --save-total-limit 1)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    from align.integrity import seal

    save = trainer._save_checkpoint

    def sealed_save(model, trial):
        limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None
        try:
            save(model, trial)
        finally:
            trainer.args.save_total_limit = limit
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            run_dir = trainer._get_output_dir(trial=trial)
            seal(Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, use_mtime=True,
                               best_model_checkpoint=trainer.state.best_model_checkpoint)

    trainer._save_checkpoint = sealed_save


def load_trained_adapter(model, checkpoint: Path) -> None:
    """Load the trained "default" adapter of a checkpoint that also holds other adapters.

    A PEFT model with several adapters (DPO's and GRPO's frozen "ref" copy) saves "default" at the checkpoint's top
    and the others in subfolders (ref/); transformers' Trainer then loads only the subfolders when resuming, so the
    trained adapter would restart from the parent's weights (while the optimizer state is the checkpoint's). With a
    single adapter this is the same call transformers makes itself."""
    if hasattr(model, "load_adapter") and "default" in getattr(model, "peft_config", {}) and \
            (checkpoint / "adapter_model.safetensors").is_file():
        model.load_adapter(str(checkpoint), "default", is_trainable=True)


def stage_manifest(stage: str, task: str, cfg, policy, datasets: dict[str, Any]) -> dict[str, Any]:
    """The run.json fields every stage records at start (the lifecycle adds status, times, versions)."""
    return dict(stage=stage, task=task, adapter=policy.adapter, quantized_4bit=policy.quantized_4bit,
                **policy.manifest, config=cfg.to_dict(), datasets=datasets, seed=cfg.seed)


def load_train_eval(cfg, load) -> tuple[list, list | None, dict[str, Any]]:
    """(train, eval or None, datasets manifest) from --data / --eval-data / --eval-split.

    `load(spec, split)` returns (examples, Records) for one dataset spec (split: align.data.loading.Split).
    """
    from align.data import holdout
    from align.data.loading import HELD_OUT, Split

    train, records = load(cfg.data, Split(cfg.split))
    datasets = {"train": records.describe()}
    evaluation = None
    if cfg.eval_data:
        evaluation, eval_records = load(cfg.eval_data, Split(cfg.eval_data_split, HELD_OUT, "--eval-data-split"))
        datasets["eval"] = eval_records.describe()
    elif cfg.eval_split > 0:
        train, evaluation = holdout(train, cfg.eval_split, cfg.seed)
        datasets["eval"] = {"split_of": "train", "fraction": cfg.eval_split}
    return train, evaluation, datasets

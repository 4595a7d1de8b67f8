"""Hand-off between stages: turn a finished run (`--from RUN`) into the starting point of the next stage.

A run's policy is `base (+ merged_adapters, merged in order) + adapter`, or its full model. A child stage
starts exactly from its parent's policy, in one of two ways (`--handoff`):

- `continue` (default): keep training the parent's adapter (same kind, same base, 4-bit if the parent was
  QLoRA). Exact: the child starts equal to the parent, bit for bit.
- `merge`: merge the parent's adapter into the base and train a fresh adapter on top (any kind). Exact for
  full-precision bases; a QLoRA parent's merged base is re-quantised to 4-bit, which rounds the merged weights.
  Prompt-learning adapters (prompt, prefix, ptuning) cannot be merged.

A full-fine-tuning parent's model directory simply becomes the child's base. A reward model is trained on a
merged parent (its head is new), so `align rm --from` always merges.

The frozen reference model of dpo/kto/grpo/ppo is the parent policy: TRL's trainers copy the starting adapter into
a frozen "ref" adapter of the same PeftModel (no second model copy); for full fine-tuning TRL keeps a copy.

Adapter kinds (align.adapters): a continued prompt-learning adapter (prompt, ptuning) trains its saved virtual-token
embeddings directly; bitfit and bottleneck parents (align.native_adapters) are merged in memory for `--handoff
merge`. `check_adapter` refuses, at validation, every kind × stage × hand-off combination that cannot work, naming
the kind and the reason (align.adapters.STAGE_LIMITS, prompt-learning parents with merge, bitfit/bottleneck parents
under a 4-bit or fully fine-tuned child, adalora without --max-steps, LOMO with an adapter).

Refused with AlignError (exit 2): a directory that is not a run, a run that is not `completed`, a reward-model
run as the policy parent of dpo/kto/grpo/ppo, a `--model` that is not the parent's base, missing weights, weights that
are not the ones the run recorded when it completed (align.runs.verify_run), a base model whose weights or config
changed since the parent was trained (run.json `base_files`: size + sha256 of the base's weight files and
config.json, recorded when the first stage starts from it and handed down to every child).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align import integrity
from align.adapters import ADAPTERS, stage_limit
from align.errors import AlignError
from align.runs import read_manifest, sha256_path, verify_run

POLICY_STAGES = ("sft", "dpo", "kto", "orpo", "simpo", "grpo", "ppo", "distill")


@dataclass
class Parent:
    path: Path
    manifest: dict[str, Any]

    stage = property(lambda self: self.manifest.get("stage"))
    adapter = property(lambda self: self.manifest.get("adapter"))
    quantized_4bit = property(lambda self: bool(self.manifest.get("quantized_4bit")))
    merged_adapters = property(lambda self: list(self.manifest.get("merged_adapters", [])))

    @property
    def full(self) -> bool:
        return self.adapter == "full"

    @property
    def weights_dir(self) -> Path:
        return self.path / ("model" if self.full else "adapter")

    @property
    def base_model(self) -> str:
        return str(self.weights_dir) if self.full else self.manifest["base_model"]

    def lineage(self) -> list[dict[str, Any]]:
        """The chain from the base to this run (inclusive), for the child's manifest."""
        own = {"run": str(self.path.resolve()), "stage": self.stage, "adapter": self.adapter}
        return [*self.manifest.get("lineage", []), own]


def base_fingerprint(base_model: str) -> str | None:
    config = Path(base_model) / "config.json"
    return sha256_path(config) if config.is_file() else None


def base_files(base_model: str) -> integrity.Records | None:
    """Records of a local base model's weight files and config.json (None for a hub id)."""
    files = integrity.model_files(Path(base_model))
    return integrity.record_files(Path(base_model), files) if files else None


def base_problems(manifest: dict[str, Any]) -> list[str]:
    """How the base model named by a run's manifest differs from the one it recorded (empty: the same, or not
    recorded: a hub id, or a run written before align recorded it)."""
    recorded = manifest.get("base_files")
    problems = [] if not recorded or manifest.get("adapter") == "full" else \
        integrity.verify_files(Path(manifest["base_model"]), recorded)
    for adapter, files in (manifest.get("merged_files") or {}).items():  # adapters merged into the base, in order
        problems.extend(integrity.verify_files(Path(adapter), files))
    return problems


def merged_files(parent: Parent, handoff: str) -> dict[str, integrity.Records]:
    """Records of every adapter merged into a child's base: the parent's, plus its own when the child merges it
    (taken from the parent's manifest: nothing is hashed again)."""
    out = dict(parent.manifest.get("merged_files") or {})
    artifacts = parent.manifest.get("artifacts") or {}
    if handoff == "merge" and not parent.full and artifacts:
        out[str(parent.weights_dir.resolve())] = {k.removeprefix("adapter/"): v for k, v in artifacts.items()
                                                  if k.startswith("adapter/")}
    return out


def resolve_parent(path: str | Path, child_stage: str, model: str | None = None, flag: str = "--from") -> Parent:
    """Check that `path` is a finished run that `child_stage` may start from (`flag`: the option naming it; distill's
    --teacher is checked the same way)."""
    path = Path(path)
    if not path.is_dir():
        raise AlignError(f"{flag} {path}: no such directory. Pass the --output directory of a finished stage.")
    manifest = read_manifest(path)
    parent = Parent(path, manifest)
    if manifest.get("status") != "completed":
        raise AlignError(f"{flag} {path}: the run's status is {manifest.get('status')!r}, not 'completed'. "
                         "Finish it first (rerun its command with --resume).")
    if child_stage in ("dpo", "kto", "orpo", "simpo", "grpo", "ppo", "pairs", "distill") and parent.stage not in POLICY_STAGES:
        role, verb = ("teacher", "use") if flag == "--teacher" else ("policy parent", "start from")
        raise AlignError(f"{flag} {path}: a {parent.stage!r} run cannot be the {role} of {child_stage}; "
                         f"{verb} a policy run ({', '.join(POLICY_STAGES)})"
                         + (" and pass the reward model with --reward-model." if parent.stage == "rm" and flag == "--from"
                            and child_stage in ("grpo", "ppo", "pairs") else "."))
    if not parent.weights_dir.is_dir():
        raise AlignError(f"{flag} {path}: missing {parent.weights_dir.name}/ — the run's weights are not there.")
    if problems := verify_run(path, manifest):
        raise AlignError(f"{path}: its files are not the ones it recorded when it completed: " + "; ".join(problems)
                         + ". Restore them, or train the run again (in a pipeline: align run --force rebuilds it).")
    if model and not parent.full and Path(model).resolve() != Path(parent.base_model).resolve() \
            and model != parent.base_model:
        raise AlignError(f"Base/adapter mismatch: {path} was trained on base {parent.base_model}, but --model is "
                         f"{model}. Drop --model (the base comes from the parent run) or pick the matching run.")
    if problems := base_problems(manifest):
        raise AlignError(f"Base/adapter mismatch: the base model at {parent.base_model} (with the adapters merged into "
                         f"it) changed since {path} was trained on it ({'; '.join(problems)}). Restore the original "
                         "base or retrain the parent.")
    recorded = manifest.get("base_config_sha256")
    if recorded and not parent.full:
        current = base_fingerprint(parent.base_model)
        if current is None:
            raise AlignError(f"{flag} {path}: its base model {parent.base_model} is gone. Restore it at that path.")
        if current != recorded:
            raise AlignError(f"Base/adapter mismatch: the base model at {parent.base_model} changed since {path} "
                             "was trained (config.json differs). Restore the original base or retrain the parent.")
    return parent


# -- building models -------------------------------------------------------------------------------------
def materialize_base(base_model: str, merged_adapters: list[str], *, quantize_4bit: bool, task: str = "causal-lm",
                     dtype: str = "auto", trust_remote_code: bool = False, attn_implementation: str | None = None,
                     num_labels: int = 1):
    """The base model with `merged_adapters` merged in order (re-quantised to 4-bit if asked); a seq-cls model gets a
    head of `num_labels` outputs."""
    from peft import PeftConfig, PeftModel

    from align.models import load_base_model

    kwargs = dict(task=task, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                  num_labels=num_labels)
    if not merged_adapters:
        return load_base_model(base_model, quantize_4bit=quantize_4bit, **kwargs)
    from align.native_adapters import is_native_dir, load

    if quantize_4bit and any(is_native_dir(a) for a in merged_adapters):
        raise AlignError("A bitfit/bottleneck adapter in the merged chain cannot be re-quantised to 4-bit (a saved "
                         "transformers model cannot hold it). Train a full-precision adapter on top instead of qlora.")
    model = load_base_model(base_model, quantize_4bit=False, **kwargs)
    for adapter in merged_adapters:
        if is_native_dir(adapter):
            load(model, adapter, trainable=False, top=False)
            continue
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None  # merging needs no task head; lets a causal-LM adapter merge into a seq-cls model
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    if not quantize_4bit:
        return model
    with tempfile.TemporaryDirectory(prefix="align-merged-base-") as tmp:
        model.save_pretrained(tmp)
        return load_base_model(tmp, quantize_4bit=True, **kwargs)


def load_adapter(model, adapter_dir: str | Path, trainable: bool):
    """`model` with the saved adapter of `adapter_dir` (PEFT or align.native_adapters format)."""
    from peft import PeftConfig, PeftModel
    from safetensors import SafetensorError

    from align import native_adapters

    if native_adapters.is_native_dir(adapter_dir):
        return native_adapters.load(model, adapter_dir, trainable=trainable)
    try:
        if trainable and PeftConfig.from_pretrained(str(adapter_dir)).is_prompt_learning:
            return _trainable_prompt(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False))
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        if not hasattr(model.base_model, "trainable_adapter_name") and type(model.base_model).__name__ == "AdaLoraModel":
            # PEFT's AdaLoRA forward needs it even frozen, and adds its orthogonality regulariser (a training term)
            # to any loss computed with labels: a frozen adapter's loss is the model's own
            model.base_model.trainable_adapter_name = "default"
            model.peft_config["default"].orth_reg_weight = 0.0
        return model
    except SafetensorError as e:
        raise AlignError(f"{adapter_dir}: the adapter weights cannot be read ({str(e)[:200]}); the file is damaged "
                         "or truncated. Restore the run, or retrain it.") from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise AlignError(f"Base/adapter mismatch: the adapter in {adapter_dir} does not fit its base model "
                         f"({str(e).splitlines()[0][:200]}).") from None


def _trainable_prompt(model):
    """A loaded prompt-learning adapter made trainable: PEFT saves only the virtual tokens' final embeddings (not
    the MLP/LSTM/prefix-projection weights) and refuses to load them trainable, so they are trained directly, as
    prompt tuning does (the adapter stays in PEFT's inference mode, which uses exactly these embeddings)."""
    model.prompt_encoder["default"].embedding.weight.requires_grad_(True)
    return model


def load_run_policy(run_path: str | Path, *, dequantize: bool = False, trainable: bool = False,
                    trust_remote_code: bool = False):
    """(model, tokenizer, manifest) of a completed run: its base (+ merged adapters) + adapter, or full model.

    With `dequantize=True` a QLoRA run's base is loaded in full precision (for merging). Model code runs only with
    `trust_remote_code` (the current command's --trust-remote-code), never because the run's manifest recorded it.
    """
    from align.models import load_tokenizer

    parent = resolve_parent(run_path, child_stage="load")
    trust = trust_remote_code
    if parent.manifest.get("config", {}).get("trust_remote_code") and not trust:
        raise AlignError(f"{run_path} was trained with --trust-remote-code: its base model "
                         f"{parent.manifest.get('base_model')} runs its own code. Pass --trust-remote-code to allow it.")
    tokenizer = load_tokenizer(str(parent.weights_dir), trust)
    task = parent.manifest.get("task", "causal-lm")
    if parent.full:
        from align.models import load_base_model

        return load_base_model(str(parent.weights_dir), task=task, trust_remote_code=trust,
                               num_labels=head_count(parent.manifest)), tokenizer, parent.manifest
    base = materialize_base(parent.base_model, parent.merged_adapters, task=task, trust_remote_code=trust,
                            quantize_4bit=parent.quantized_4bit and not dequantize, num_labels=head_count(parent.manifest))
    return load_adapter(base, parent.weights_dir, trainable), tokenizer, parent.manifest


def head_count(manifest: dict[str, Any]) -> int:
    """Outputs of a reward model run's head (several for a pointwise RM with several label columns; else 1)."""
    return int(manifest.get("num_labels", 1))


@dataclass
class Policy:
    """A stage's trainable starting model plus what its manifest must record."""

    model: Any
    tokenizer: Any
    adapter: str
    quantized_4bit: bool
    manifest: dict[str, Any]


def plan(cfg, stage: str, task: str = "causal-lm") -> tuple[Parent | None, str | None, str]:
    """(parent run or None, hand-off or None, adapter kind the child trains) for a stage's config."""
    if not cfg.from_run:
        return None, None, cfg.adapter or "lora"
    parent = resolve_parent(cfg.from_run, stage, cfg.model)
    handoff = "merge" if (task != parent.manifest.get("task", "causal-lm") or parent.full) else cfg.handoff
    if handoff == "continue":
        return parent, handoff, parent.adapter
    return parent, handoff, cfg.adapter or ("qlora" if parent.quantized_4bit else "lora")


def check_adapter(cfg, stage: str, task: str = "causal-lm") -> None:
    """Refuse (AlignError listing every reason) an adapter kind × stage × hand-off combination that cannot work."""
    from align.native_adapters import is_native_dir

    parent, handoff, kind = plan(cfg, stage, task)
    if kind not in ADAPTERS:
        return  # reported by AdapterOptions.check
    problems = []
    who = f"--adapter {kind}" if cfg.adapter else f"the '{kind}' adapter" + (
        f" of --from {parent.path}" if handoff == "continue" else "")
    if limit := stage_limit(kind, stage):
        problems.append(f"{who}: {limit}.")
    if parent and handoff == "continue" and cfg.adapter not in (None, parent.adapter):
        problems.append(f"--adapter {cfg.adapter}: with --handoff continue the child keeps training the parent's "
                        f"'{parent.adapter}' adapter. Use --handoff merge to train a new '{cfg.adapter}' adapter.")
    if parent and handoff == "merge" and not parent.full:
        why = "rm always merges its parent (its head is new), and " if cfg.handoff == "continue" else ""
        if ADAPTERS[parent.adapter].prompt_learning:
            problems.append(f"--from {parent.path}: {why}its '{parent.adapter}' adapter adds virtual tokens and cannot "
                            "be merged into the base" + (" (use --handoff continue)." if not why else "."))
        native = [a for a in [*parent.merged_adapters, str(parent.weights_dir)] if is_native_dir(a)]
        if native and (ADAPTERS[kind].full or ADAPTERS[kind].quantize_4bit):
            problems.append(f"--adapter {kind} on --from {parent.path}: its bitfit/bottleneck adapter is merged in "
                            f"memory, and a {kind} child " + ("saves a plain model directory" if kind == "full" else
                                                              "re-quantises the merged base through one") +
                            ", which cannot hold it. Train a full-precision adapter (e.g. lora) on top.")
    if kind == "adalora" and handoff != "continue":
        steps = getattr(cfg, "max_steps", -1)
        if steps <= 0:
            problems.append(f"{who}: its rank schedule needs the total step count; give --max-steps N.")
        elif cfg.adalora_tinit + cfg.adalora_tfinal >= steps:
            problems.append(f"{who}: --adalora-tinit {cfg.adalora_tinit} + --adalora-tfinal "
                            f"{cfg.adalora_tfinal} leave no pruning phase in --max-steps {steps}.")
    if cfg.full_optimizer != "adamw":
        if kind != "full":
            problems.append(f"--full-optimizer {cfg.full_optimizer}: LOMO/AdaLOMO update every weight inside backward "
                            f"(full fine-tuning only); the '{kind}' adapter trains with AdamW. Drop the flag or use "
                            "--adapter full.")
        else:
            import importlib.util

            from align.models import has_cuda

            if cfg.full_optimizer == "adalomo" and not has_cuda():
                problems.append("--full-optimizer adalomo: lomo-optim's AdaLOMO allocates its state on a CUDA GPU, and "
                                "there is none here. Use --full-optimizer lomo (works on CPU) or adamw.")
            if importlib.util.find_spec("lomo_optim") is None:
                problems.append(f"--full-optimizer {cfg.full_optimizer} needs the lomo-optim package: "
                                "pip install lomo-optim.")
    if problems:
        raise AlignError(problems[0], problems[1:]) if len(problems) == 1 else AlignError(
            "The adapter cannot train here:", problems)


def build_policy(cfg, *, stage: str, task: str = "causal-lm", peft_task: str = "CAUSAL_LM", num_labels: int = 1) -> Policy:
    """The trainable model a stage starts from: a base + fresh adapter, or the parent policy (`cfg.from_run`). A
    seq-cls model gets a head of `num_labels` outputs (recorded in the manifest when more than 1)."""
    from align.adapters import peft_config
    from align.models import attach_adapter, load_tokenizer

    check_adapter(cfg, stage, task)
    parent, handoff, kind_name = plan(cfg, stage, task)
    kind = ADAPTERS[kind_name]
    # --dtype auto loads bf16 on a GPU; a model trained whole keeps float32 master weights there (the trainer's
    # autocast computes in bf16): an AdamW step below 1/256 of a bf16 weight would be rounded away
    dtype = "float32" if kind.full and cfg.dtype == "auto" else cfg.dtype
    opts = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
                num_labels=num_labels)
    heads = {"num_labels": num_labels} if num_labels != 1 else {}
    if parent is None:
        model = materialize_base(cfg.model, [], quantize_4bit=kind.quantize_4bit, task=task, **opts)
        model = attach_adapter(model, peft_config(_with_kind(cfg, kind.name), peft_task, cfg.model),
                               gradient_checkpointing=cfg.gradient_checkpointing)
        return Policy(model, load_tokenizer(cfg.model, cfg.trust_remote_code), kind.name, kind.quantize_4bit,
                      dict(base_model=_ref(cfg.model), merged_adapters=[], parent=None, lineage=[], handoff=None,
                           base_config_sha256=base_fingerprint(cfg.model), base_files=base_files(cfg.model), **heads))

    tokenizer = load_tokenizer(str(parent.weights_dir), cfg.trust_remote_code)
    common = dict(parent=str(parent.path.resolve()), lineage=parent.lineage(), handoff=handoff,
                  # a full fine-tuning parent is itself the child's base: fingerprint its model directory
                  base_config_sha256=base_fingerprint(parent.base_model) if parent.full
                  else parent.manifest.get("base_config_sha256"),
                  base_files=base_files(parent.base_model) if parent.full else parent.manifest.get("base_files"),
                  merged_files=merged_files(parent, handoff), **heads)
    if handoff == "continue":
        base = materialize_base(parent.base_model, parent.merged_adapters, quantize_4bit=parent.quantized_4bit,
                                task=task, **opts)
        model = load_adapter(base, parent.weights_dir, trainable=True)
        return Policy(model, tokenizer, parent.adapter, parent.quantized_4bit,
                      dict(base_model=parent.base_model, merged_adapters=parent.merged_adapters, **common))

    # merge: the parent's adapter (if any) joins the merged chain; a fresh adapter goes on top
    merged = parent.merged_adapters if parent.full else [*parent.merged_adapters, str(parent.weights_dir.resolve())]
    base = materialize_base(parent.base_model, merged, quantize_4bit=kind.quantize_4bit, task=task, **opts)
    model = attach_adapter(base, peft_config(_with_kind(cfg, kind.name), peft_task, parent.base_model),
                           gradient_checkpointing=cfg.gradient_checkpointing)
    return Policy(model, tokenizer, kind.name, kind.quantize_4bit,
                  dict(base_model=_ref(parent.base_model), merged_adapters=merged, **common))


def _with_kind(cfg, kind: str):
    import dataclasses

    return dataclasses.replace(cfg, adapter=kind) if cfg.adapter != kind else cfg


def _ref(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model

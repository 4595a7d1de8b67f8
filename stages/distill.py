"""`align distill`: on-policy distillation on TRL's DistillationTrainer (Agarwal et al., 2024, "On-Policy
Distillation of Language Models").

The student (a base with a fresh adapter, `--model`, or a finished policy run, `--from`, handed off as every stage
does: align.handoff) samples one completion per prompt from itself, and is trained to match the teacher's
next-token distribution on those tokens. Per completion token t, with p_s = softmax(z_s / T), p_t = softmax(z_t / T)
(T = `--temperature`, also the sampling temperature) the loss is the divergence `--divergence` names:

    reverse_kl (default)  KL(p_s ‖ p_t) = Σ_v p_s log(p_s / p_t)     (mode-seeking; TRL beta = 1)
    forward_kl            KL(p_t ‖ p_s) = Σ_v p_t log(p_t / p_s)     (mass-covering; TRL beta = 0)
    jsd                   β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m),  m = β·p_t + (1 − β)·p_s  (`--beta`, default 0.5)

averaged over the completion tokens of the batch. The loss is 0 when the student equals the teacher (every
divergence is 0 at identity), so a student that starts as a copy of its teacher starts at loss 0.

The teacher (`--teacher`) is a finished policy run — its adapter merged into its base (a QLoRA run's base
dequantised first) — or a model directory / hub id; it is frozen (eval mode, no gradients). It must share the
student's tokenizer (the same token → id map) and vocabulary size: the divergence compares the two distributions id
by id. A different tokenizer is refused at validation (exit 2).

Data: prompts, read as grpo reads them (align.data.prompts: `prompt`, `messages` — everything before the last
assistant turn — or `question`); other columns are ignored. With held-out data (`--eval-data` / `--eval-split`) the
same loss is logged on completions the student samples for the held-out prompts (`eval_loss`).

Not supported (refused at validation): prompt-learning adapters (prompt, prefix, ptuning) for the student or the
teacher — TRL's loss runs the backbone directly, so the virtual tokens would be skipped. TRL's stable trainer is
fully on-policy (GKD's λ = 1); the mixture with the dataset's own completions (λ < 1, trl.experimental's GKD) is not
offered.

Raises AlignError (exit 2) for config, data, parent and teacher problems, all reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from align.adapters import AdapterOptions
from align.config import Config, opt
from align.errors import AlignError, Problems
from align.stages.common import as_dataset, finish_stage, launch_or_join, start_stage, trainer_arguments
from align.stages.online import load_prompt_data
from align.stages.options import DataOptions, ModelOptions, TrainOptions

# --divergence -> TRL's generalized-JSD interpolation beta (0 = forward KL, 1 = reverse KL)
DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


@dataclass
class DistillConfig(TrainOptions, DataOptions, AdapterOptions, ModelOptions, Config):
    teacher: str | None = opt(None, "The teacher: a finished policy run (sft, dpo, grpo, ppo, distill; its adapter is "
                                    "merged into its base) or a model directory / hub id. Frozen; it must use the "
                                    "student's tokenizer.")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = opt(
        "reverse_kl", "Per-token divergence between student and teacher: reverse_kl = KL(student‖teacher) "
                      "(mode-seeking), forward_kl = KL(teacher‖student), jsd = generalized Jensen-Shannon (--beta).")
    beta: float | None = opt(None, "--divergence jsd only: weight β of the teacher in the mixture m = β·teacher + "
                                   "(1−β)·student (0.5 = the symmetric JSD; default 0.5; 0 and 1 are --divergence "
                                   "forward_kl / reverse_kl).", range="(0, 1)")
    temperature: float = opt(1.0, "Sampling temperature of the student's completions; both distributions are "
                                  "softened by it in the loss too.", range="(0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling threshold of the student's completions.", range="(0, 1]")
    max_completion_length: int = opt(256, "Maximum tokens the student samples per prompt.", range="[1, inf)")

    def check(self, problems: Problems) -> None:
        if self.beta is not None and self.divergence != "jsd":
            problems.add(f"--beta {self.beta} weighs the generalized JSD; --divergence {self.divergence} has no β. "
                         "Drop --beta, or use --divergence jsd.")
        problems.extend(teacher_problems(self))

    def trl_beta(self) -> float:
        return DIVERGENCE_BETA.get(self.divergence, 0.5 if self.beta is None else self.beta)


def teacher_problems(cfg: DistillConfig) -> list[str]:
    """What is wrong with --teacher: missing, not a finished policy run or model, a prompt-learning adapter, or a
    tokenizer / vocabulary other than the student's (checked when both are on disk; a pipeline's earlier stages are
    checked when the distill stage starts)."""
    from align.handoff import resolve_parent
    from align.models import check_model_path

    if not cfg.teacher:
        return ["--teacher is required: a finished policy run (the --output of align sft/dpo/grpo/ppo/distill) or a "
                "model directory."]
    teacher = Path(cfg.teacher)
    if (teacher / "run.json").is_file():
        try:
            parent = resolve_parent(teacher, "distill", flag="--teacher")
        except AlignError as e:
            return [str(e)]
        from align.adapters import ADAPTERS

        if parent.adapter in ADAPTERS and ADAPTERS[parent.adapter].prompt_learning:
            return [f"--teacher {teacher}: its '{parent.adapter}' adapter adds virtual tokens, which cannot be merged "
                    "into its base and which TRL's distillation loss skips. Use a teacher trained with a weight "
                    "adapter (lora, ...) or full fine-tuning."]
        teacher_dir, teacher_base = parent.weights_dir, parent.base_model
    elif problem := check_model_path(cfg.teacher, "--teacher"):
        return [problem + (" Or name a finished run (a directory with run.json)." if teacher.is_dir() else "")]
    else:
        teacher_dir = teacher_base = teacher
    student_dir, student_base = student_source(cfg)
    if student_dir is None or not Path(teacher_dir).is_dir():
        return []  # a hub id or a pipeline stage that has not run yet: load_teacher compares vocab_size
    return vocabulary_problems(cfg, Path(teacher_dir), Path(teacher_base), Path(student_dir), Path(student_base))


def student_source(cfg: DistillConfig) -> tuple[Path | None, Path | None]:
    """(directory holding the student's tokenizer, its base model directory), or (None, None) when not on disk."""
    from align.handoff import Parent
    from align.runs import read_manifest

    if cfg.from_run:
        run = Path(cfg.from_run)
        if not (run / "run.json").is_file():
            return None, None  # reported by the parent check
        try:
            parent = Parent(run, read_manifest(run))
        except AlignError:
            return None, None
        return parent.weights_dir, Path(parent.base_model)
    if cfg.model and Path(cfg.model).is_dir():
        return Path(cfg.model), Path(cfg.model)
    return None, None


def vocabulary_problems(cfg, teacher_dir: Path, teacher_base: Path, student_dir: Path, student_base: Path) -> list[str]:
    import json

    from align.models import load_tokenizer

    def vocab_size(base: Path) -> int | None:
        config = base / "config.json"
        try:
            return json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
        except (OSError, ValueError):
            return None

    try:
        teacher_vocab = load_tokenizer(str(teacher_dir), cfg.trust_remote_code).get_vocab()
        student_vocab = load_tokenizer(str(student_dir), cfg.trust_remote_code).get_vocab()
    except AlignError as e:
        return [str(e)]
    fix = ("Distillation compares the two next-token distributions token id by token id, so the teacher must use the "
           "student's tokenizer: pick a teacher and student of the same model family (or build both with the same "
           "tokenizer).")
    if teacher_vocab != student_vocab:
        differ = sorted(t for t in set(teacher_vocab) ^ set(student_vocab))
        moved = sorted(t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t])
        example = differ[0] if differ else moved[0]
        return [f"--teacher {cfg.teacher}: its tokenizer ({len(teacher_vocab)} tokens) is not the student's "
                f"({len(student_vocab)} tokens, from {student_dir}): {len(differ)} tokens are in only one of them and "
                f"{len(moved)} have other ids (e.g. {example!r}). {fix}"]
    sizes = vocab_size(teacher_base), vocab_size(student_base)
    if None not in sizes and sizes[0] != sizes[1]:
        return [f"--teacher {cfg.teacher}: its vocab_size is {sizes[0]} (config.json of {teacher_base}), the "
                f"student's {sizes[1]} ({student_base}). {fix}"]
    return []


def load_teacher(cfg: DistillConfig, student):
    """The frozen teacher model: a run's policy with its adapter merged (a QLoRA base dequantised), or a model."""
    from align.handoff import load_run_policy
    from align.models import load_base_model

    if (Path(cfg.teacher) / "run.json").is_file():
        model, _, _ = load_run_policy(cfg.teacher, dequantize=True, trust_remote_code=cfg.trust_remote_code)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        model = load_base_model(cfg.teacher, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                attn_implementation=cfg.attn_implementation)
    sizes = model.config.get_text_config().vocab_size, student.config.get_text_config().vocab_size
    if sizes[0] != sizes[1]:  # a hub-id teacher or student, not comparable at validation
        raise AlignError(f"--teacher {cfg.teacher}: its vocab_size is {sizes[0]}, the student's {sizes[1]}. "
                         "Distillation compares the two next-token distributions token id by token id; use a teacher "
                         "with the student's tokenizer.")
    model.eval()
    model.requires_grad_(False)
    return model


def build_trainer(cfg: DistillConfig, started, callbacks):
    """TRL's DistillationTrainer on the student policy and the frozen teacher."""
    from trl import DistillationConfig, DistillationTrainer

    from align.models import disable_dropout

    policy = started.policy
    disable_dropout(policy.model)  # the student's forward is deterministic: a copy of the teacher is at loss 0
    args = DistillationConfig(
        **trainer_arguments(cfg, started.run, started.evaluation is not None), beta=cfg.trl_beta(),
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_completion_length=cfg.max_completion_length,
        disable_dropout=True,
    )
    return DistillationTrainer(
        model=policy.model, teacher_model=load_teacher(cfg, policy.model), args=args, processing_class=policy.tokenizer,
        train_dataset=as_dataset(started.train), eval_dataset=as_dataset(started.evaluation), callbacks=callbacks,
    )


def main(cfg: DistillConfig) -> Path:
    """Run on-policy distillation as configured; returns the run directory."""
    if (workers_run := launch_or_join(cfg, "distill", load_prompt_data)) is not None:
        return workers_run  # --num-processes: the launched processes trained
    from align.models import check_causal, check_model_path

    if cfg.teacher and not Path(cfg.teacher).exists() and check_model_path(cfg.teacher, "--teacher") is None:
        check_causal(cfg.teacher, cfg.trust_remote_code)  # a hub id that cannot be fetched fails before the run dir
    started = start_stage(cfg, "distill", load_prompt_data)
    teacher = str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).is_dir() else cfg.teacher
    return finish_stage(started, cfg, stage="distill", task="causal-lm",
                        teacher={"model": teacher, "divergence": cfg.divergence, "trl_beta": cfg.trl_beta()},
                        make_trainer=lambda callbacks: build_trainer(cfg, started, callbacks))

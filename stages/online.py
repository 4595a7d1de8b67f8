"""Options and helpers shared by the online-RL stages (grpo, ppo): reward sources, rollout sampling, prompt data,
and the rollout engine built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.config import opt
from align.errors import AlignError, Problems
from align.models import has_cuda
from align.stages.common import load_train_eval


@dataclass
class RewardOptions:
    reward: list[str] = opt(factory=list, help="Reward specs (repeatable): built-in name, file.py:fn, package.module:fn, "
                                               "entry-point name or rm run; optional (key=value) settings and @weight.")
    reward_model: str | None = opt(None, "A reward-model run (align rm) used as a reward source (weight 1).")
    reward_timeout: float = opt(60.0, "Seconds a reward function may take per call before it is a fault.", range="(0, inf)")
    reward_faults: Literal["raise", "skip"] = opt(
        "raise", "On a reward fault (exception, NaN, wrong length, timeout): stop with an error naming the function "
                 "and sample, or skip the sample (scored None, logged).")

    def check(self, problems: Problems) -> None:
        if not self.reward and not self.reward_model:
            problems.add("Give at least one reward: --reward SPEC (e.g. accuracy) or --reward-model RM_RUN.")
        if self.reward or self.reward_model:
            from align.rewards import resolve_rewards

            try:
                resolve_rewards(self.reward_specs())
            except Exception as e:  # AlignError listing every bad spec
                problems.add_error(e)

    def reward_specs(self) -> list[str]:
        return [*self.reward, *([self.reward_model] if self.reward_model else [])]

    def reward_manifest(self) -> list[dict]:
        """run.json's record of the rewards: each one's metric name, spec and weight."""
        from align.rewards import resolve_rewards

        return [r.describe() for r in resolve_rewards(self.reward_specs())]

    def guarded_rewards(self):
        from align.rewards import guard_all
        from align.rewards.reward_model import allow_remote_code

        guarded = guard_all(self.reward_specs(), timeout=self.reward_timeout, on_fault=self.reward_faults)
        return allow_remote_code(guarded, getattr(self, "trust_remote_code", False))


@dataclass
class ToolOptions:
    tool: list[str] = opt(factory=list, help="Tools the model may call (repeatable): built-in name (calculator), file.py:fn, "
                                             "package.module:fn or an align.tools entry point; a typed function with "
                                             "an Args: docstring. Rollouts become multi-turn.")
    environment: str | None = opt(None, "A class (file.py:Class, package.module:Class or an align.environments entry "
                                        "point) whose public methods are tools; one instance per rollout keeps its state.")
    max_tool_calls: int = opt(4, "Most tool-calling turns per rollout (each runs that turn's calls); the model's next "
                                 "turn after the last is its answer.", range="[1, inf)")
    tool_timeout: float = opt(10.0, "Seconds a tool call may take; past it the model reads a timeout error (counted in "
                                    "tools/timeouts).", range="(0, inf)")

    def enabled(self) -> bool:
        return bool(self.tool or self.environment)

    def toolset(self):
        from align.rewards.tools import ToolSet

        return ToolSet.resolve(self.tool, self.environment, self.tool_timeout)

    def check(self, problems: Problems) -> None:
        from align.config import user_set

        if not self.enabled():
            for name in ("max_tool_calls", "tool_timeout"):
                if user_set(self, name):
                    flag = "--" + name.replace("_", "-")
                    problems.add(f"{flag} {getattr(self, name)} applies to multi-turn rollouts with tools; add --tool "
                                 f"SPEC or --environment SPEC, or drop {flag}.")
            return
        try:
            toolset = self.toolset()
        except AlignError as e:
            problems.add_error(e)
            return
        if (tokenizer := self._policy_tokenizer()) is not None:
            from align.stages.tool_rollout import template_problem

            if problem := template_problem(tokenizer, toolset.schemas()):
                problems.add(f"--tool / --environment: the tokenizer of {self._policy_source()}: {problem}")

    def _policy_source(self) -> str | None:
        """The run or model the rollouts sample from (each command names it its own way)."""
        return next((getattr(self, n) for n in ("from_run", "target", "model") if getattr(self, n, None)), None)

    def _policy_tokenizer(self):
        """The sampling policy's tokenizer, or None when it cannot be loaded here (the other checks say why)."""
        from pathlib import Path

        from align.models import load_tokenizer

        source = self._policy_source()
        if source is None:
            return None
        path = Path(str(source))
        if (path / "run.json").is_file():  # a run: its saved tokenizer
            path = path / ("model" if (path / "model").is_dir() else "adapter")
        elif not path.is_dir():
            return None  # a hub id (checked where the model loads) or a missing directory
        try:
            return load_tokenizer(str(path), getattr(self, "trust_remote_code", False))
        except (AlignError, OSError, ValueError):
            return None

    def tools_manifest(self) -> dict | None:
        """run.json's record of the tools (None without any)."""
        if not self.enabled():
            return None
        return {"tool": self.tool, "environment": self.environment, "max_tool_calls": self.max_tool_calls,
                "tool_timeout": self.tool_timeout}


@dataclass
class RolloutOptions:
    num_generations: int = opt(4, "Completions sampled per prompt (the group).", range="[1, inf)")
    max_completion_length: int = opt(256, "Maximum tokens per completion.", range="[1, inf)")
    temperature: float = opt(1.0, "Sampling temperature.", range="[0, inf)")
    top_p: float = opt(1.0, "Nucleus sampling threshold.", range="(0, 1]")
    backend: Literal["auto", "hf", "vllm"] = opt("auto", "Rollout backend: auto = vllm if installed, on GPU and in one "
                                                          "process, else hf; vllm with --num-processes N: one engine per process.")
    vllm_memory: float = opt(0.3, "vllm backend: fraction of GPU memory (of host RAM on CPU) for the engine.", range="(0, 1]")
    vllm_server: str | None = opt(None, "Use this separately started vLLM server (URL) instead of a colocated "
                                        "engine; it must run the policy's base with --enable-lora and "
                                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.")
    is_correction: Literal["auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = opt(
        "auto", "Importance-sampling correction of the rollout/trainer mismatch: truncated (TIS) or masked (MIS) "
                "weights per token or sequence; auto = sequence_mask when sampling with vLLM on a GPU, else none.")
    is_cap: float = opt(3.0, "Upper bound of the correction weights (truncated to it, or masked above it).", range="(0, inf)")
    is_min: float | None = opt(None, "Lower bound of the correction weights (default: none).", range="[0, inf)")
    sync_check: int = opt(0, "Every N steps check that the sampler serves the current adapter and matches the "
                             "trainer's log-probs on the sampled tokens (vllm backend); 0 = off.", range="[0, inf)")
    sync_threshold: float = opt(0.1, "Sync check: largest allowed mean |Δ log p| per sampled token, in nats.", range="(0, inf)")

    def resolved_backend(self) -> str:
        from align.stages.rollout import choose_backend

        if self.vllm_server:
            return "vllm"
        return "hf" if self.backend == "auto" and self.several_processes() else choose_backend(self.backend)

    def several_processes(self) -> bool:
        """Trained by more than one process (--num-processes, or started by a launcher)."""
        return self.process_count() > 1

    def process_count(self) -> int:
        """The training processes: --num-processes, or the launcher's world size."""
        from align.launch import launched, world_size

        return max(getattr(self, "num_processes", None) or 1, world_size() if launched() else 1)

    def correction(self) -> str:
        """The --is-correction mode in force (auto resolved)."""
        import torch

        if self.is_correction != "auto":
            return self.is_correction
        return "sequence_mask" if self.resolved_backend() == "vllm" and torch.cuda.is_available() else "none"

    def sync_check_due(self, step: int) -> bool:
        return bool(self.sync_check) and step % self.sync_check == 0

    def check(self, problems: Problems) -> None:
        if self.resolved_backend() == "hf" and self.is_correction not in ("auto", "none") \
                and not getattr(self, "async_rollouts", False):  # --async: the snapshot sampler gives log-probs
            problems.add(f"--is-correction {self.is_correction} needs the sampler's log-probs: the hf backend samples "
                         "from the trained model itself, so there is no mismatch to correct. Use --backend vllm.")
        if self.is_cap <= 0 or (self.is_min is not None and not 0 <= self.is_min < self.is_cap):
            problems.add(f"--is-cap must be > 0 and --is-min in [0, --is-cap), got {self.is_cap} and {self.is_min}.")
        if self.sync_check and self.resolved_backend() == "hf":
            problems.add("--sync-check compares the vllm sampler with the trainer; the hf backend samples from the "
                         "trained model itself. Use --backend vllm, or drop --sync-check.")
        if self.sync_check < 0 or self.sync_threshold <= 0:
            problems.add(f"--sync-check must be >= 0 and --sync-threshold > 0, got {self.sync_check} and "
                         f"{self.sync_threshold}.")
        engines = self.process_count() if self.resolved_backend() == "vllm" and not self.vllm_server else 1
        if engines > 1 and self.vllm_memory * engines > 0.8 and not has_cuda():
            problems.add(f"--vllm-memory {self.vllm_memory} with {engines} processes: on CPU every process's vLLM engine "
                         f"takes that fraction of the host RAM ({self.vllm_memory * engines:.0%} in all). Lower "
                         f"--vllm-memory to {0.8 / engines:.2f} or less, or share one --vllm-server.")
        if self.num_generations < 1:
            problems.add(f"--num-generations must be at least 1, got {self.num_generations}.")
        if self.temperature <= 0:
            problems.add(f"--temperature must be > 0 (online RL samples its completions), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.add(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.max_completion_length <= 0:
            problems.add(f"--max-completion-length must be positive, got {self.max_completion_length}.")


def load_prompt_data(cfg):
    from align.data.prompts import load_prompts

    def load(spec: str, split):
        rows, records = load_prompts(spec, split=split, columns=cfg.columns, system_prompt=cfg.system_prompt)
        if hasattr(cfg, "reward_specs"):  # grpo, ppo, pairs; distill reads prompts only
            check_reward_columns(cfg, rows, records.source)
        return rows, records

    return load_train_eval(cfg, load)


def check_reward_columns(cfg, rows: list[dict], source: str) -> None:
    """Rewards that read a data column (accuracy, closeness: `answer`) fail here, not after the first rollout."""
    from align.rewards import resolve_rewards
    from align.rewards.call import missing_columns

    try:
        rewards = resolve_rewards(cfg.reward_specs())
    except AlignError:  # bad specs are reported by RewardOptions.check
        return
    problems = missing_columns(rewards, rows[0]) if rows else []
    if rows:
        from align.stages.gold import column_problems

        problems += column_problems(cfg, rows[0])
    if problems:
        raise AlignError(f"{source}: " + "; ".join(problems) + ".")


def make_rollout_engine(cfg, policy, run_dir):
    """The rollout engine (align.stages.rollout) for this config and starting policy."""
    from align.stages.rollout import Sampling, make_engine

    return make_engine(cfg.backend, policy.tokenizer,
                       Sampling(cfg.max_completion_length, cfg.temperature, cfg.top_p), server=cfg.vllm_server,
                       base_model=policy.manifest["base_model"], memory=cfg.vllm_memory, run_dir=run_dir,
                       adapter=policy.adapter, merged_adapters=policy.manifest.get("merged_adapters", []),
                       lora_rank=getattr(getattr(policy.model, "peft_config", {}).get("default"), "r", 16),
                       seed=cfg.seed)

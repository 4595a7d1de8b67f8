"""Scale-out through accelerate: `--num-processes N` and `--accelerate-config PRESET|FILE` on every training stage.

`align STAGE ... --num-processes N` validates the whole config and data once, in this process, then starts N
processes with accelerate's own launcher (`accelerate.commands.launch.launch_command`, the code behind
`accelerate launch`), each running `python -m align STAGE ...` with the same arguments. `accelerate launch [its
options] -m align STAGE ...` works the same way: a process started by a launcher never launches again.

Batch semantics (every stage): `--batch-size` is per process, so one optimizer step sees a global batch of
`--batch-size × processes × --grad-accum` examples (completions for grpo/ppo). A 2-process run with batch B/2 is the
1-process run with batch B, split in two.

Only the main process (global rank 0) writes the run directory (align.runs.Run.writer); every process takes part in
the collective operations. The run directory's writer lock (align.integrity) is held by the `align` process that
launched the workers, for as long as they run (they are told through ALIGN_HELD_LOCKS); under a plain
`accelerate launch`, rank 0 takes it. A user error found by every process is printed once (by rank 0); every process exits 2.

Presets (align/accelerate/*.yaml, accelerate's config-file format): ddp, zero2, zero3 (DeepSpeed; `pip install
deepspeed`), fsdp2. Their `mixed_precision` is 'no': align chooses the precision itself (`--dtype`; bf16 on GPUs that
support it). See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from align.errors import AlignError, Problems, did_you_mean
from align.models import has_cuda

logger = logging.getLogger(__name__)

PRESETS = ("ddp", "zero2", "zero3", "fsdp2")
PRESET_DIR = Path(__file__).parent / "accelerate"
LAUNCHED_BY_ALIGN = "ALIGN_LAUNCHED"  # set in the workers that `--num-processes` starts
SCRATCH_PREFIX = "align-launch-"  # the temporary folder of a launch (the config handed to the workers)


def launched() -> bool:
    """True in a process started by accelerate launch / torchrun (it trains; it never launches again)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def config_path(value: str) -> Path:
    """The accelerate config file of a preset name or a path."""
    return PRESET_DIR / f"{value}.yaml" if value in PRESETS else Path(value)


def config_value(accelerate_config: str | None, key: str) -> Any:
    """A key of an accelerate config file (or preset), None if absent or unreadable."""
    import yaml

    if accelerate_config is None:
        return None
    try:
        return (yaml.safe_load(config_path(accelerate_config).read_text()) or {}).get(key)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: not UTF-8 (check_options says so)
        return None


def distributed_type(accelerate_config: str | None) -> str | None:
    """The `distributed_type` of an accelerate config (DEEPSPEED, FSDP, MULTI_GPU, MULTI_CPU, ...)."""
    return config_value(accelerate_config, "distributed_type")


def requested_processes(cfg) -> int:
    """Processes asked for: --num-processes, else the accelerate config's num_processes, else 1."""
    configured = config_value(cfg.accelerate_config, "num_processes")
    return cfg.num_processes or (configured if isinstance(configured, int) and configured > 0 else 1)


def launcher_request() -> int | None:
    """In a process that `accelerate launch` started: the number of processes that command asked for (its
    --num_processes, else its config file's), read from the launcher's own command line; None if unknown.

    accelerate's simple launcher (what it runs on a machine without GPUs unless told --multi_gpu) starts ONE process
    whatever --num_processes says, and tells the process nothing about it."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return None
    # `accelerate launch ...`, `python -m accelerate.commands.launch ...` or `accelerate-launch ...`
    starts = [i + 1 for i, a in enumerate(argv) if a == "accelerate.commands.launch" or Path(a).name == "accelerate-launch"
              or a == "launch" and i and Path(argv[i - 1]).name.startswith("accelerate")]
    if not starts:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(argv[starts[0]:])
    except SystemExit:
        return None
    if args.num_processes:
        return args.num_processes
    from accelerate.commands.config import default_config_file

    configured = config_value(args.config_file or default_config_file, "num_processes")
    return configured if isinstance(configured, int) else None


def sharded_launch(accelerate_config: str | None) -> str | None:
    """'DeepSpeed' or 'FSDP' when this config (or the launcher that started this process) shards the model."""
    kind = distributed_type(accelerate_config)
    if kind == "DEEPSPEED" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DeepSpeed"
    if kind == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    return None


def check_options(num_processes: int | None, accelerate_config: str | None, problems: Problems) -> None:
    """--num-processes and --accelerate-config problems (collected with every other config problem)."""
    if num_processes is not None and num_processes < 1:
        problems.add(f"--num-processes must be at least 1, got {num_processes}.")
    if launched() and world_size() == 1 and not os.environ.get(LAUNCHED_BY_ALIGN) and (asked := launcher_request() or 1) > 1:
        problems.add(f"`accelerate launch` was asked for {asked} processes but started one: on a machine without GPUs "
                     "its default launcher runs a single process. Add --multi_gpu to `accelerate launch` (its torchrun "
                     "launcher; the processes talk over gloo on CPU), or run `align STAGE ... --num-processes "
                     f"{asked}`.")
    if num_processes is not None and launched() and num_processes != world_size():
        problems.add(f"--num-processes {num_processes}, but the launcher started {world_size()} processes. Drop "
                     "--num-processes under `accelerate launch` (its --num_processes decides), or make them agree.")
    if accelerate_config is None:
        return
    path = config_path(accelerate_config)
    if accelerate_config not in PRESETS and not path.is_file():
        problems.add(f"--accelerate-config {accelerate_config}: neither a preset ({', '.join(PRESETS)}) nor an "
                     f"existing accelerate config file.{did_you_mean(accelerate_config, PRESETS)}")
        return
    if accelerate_config not in PRESETS:  # the user's file: readable YAML (UTF-8, no duplicate keys)
        from align.config import read_yaml_mapping

        try:
            read_yaml_mapping(path, "accelerate config", "--accelerate-config")
        except AlignError as e:
            problems.add(f"--accelerate-config: {e}")
            return
    if distributed_type(accelerate_config) == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        problems.add(f"--accelerate-config {accelerate_config} uses DeepSpeed, which is not installed "
                     "(pip install deepspeed), or choose the ddp or fsdp2 preset.")


def needs_launch(cfg) -> bool:
    """Whether this process must start the workers (rather than train itself)."""
    return not launched() and ((cfg.num_processes or 1) > 1 or cfg.accelerate_config is not None)


def launch_arguments(cfg) -> list[str]:
    """`accelerate launch` options for this config (before the `-m align STAGE ...` part)."""
    n = requested_processes(cfg)
    args = ["--num_processes", str(n), "--num_machines", "1", "--main_process_port", "0"]
    if cfg.accelerate_config is not None and not (distributed_type(cfg.accelerate_config) == "MULTI_CPU"
                                                  and not has_cuda()):
        return ["--config_file", str(config_path(cfg.accelerate_config)), *args]
    # MULTI_CPU on a machine without GPUs: accelerate's launcher would start one process; torchrun over gloo runs N
    # no config: DDP over N processes (torchrun; gloo on CPU, nccl on GPUs), precision left to align
    return [*args, "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if n > 1 else [])]


def stage_arguments(cfg, stage: str, scratch: Path) -> list[str]:
    """The workers' `align STAGE` arguments: the command line as given, or (Python API, pipelines) a YAML file in
    `scratch` with the resolved config."""
    argv = getattr(cfg, "launch_argv", None)
    if argv is not None:
        return [stage, *argv]
    import yaml

    path = scratch / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "config"}))
    return [stage, "--config", str(path)]


def run(stage: str, cfg) -> None:
    """Start the workers through accelerate's launcher and wait; AlignError (exit 2) or RuntimeError when they fail.
    A user error that only the workers can see was printed by rank 0 and exits 2 here too, silently."""
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser

    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as scratch:
        command = [*launch_arguments(cfg), "--module", "align", *stage_arguments(cfg, stage, Path(scratch))]
        logger.info("Launching: accelerate launch %s", " ".join(command))
        args = launch_command_parser().parse_args(command)
        code = 0
        # the launchers copy this process's environment into the workers. PYTHONSAFEPATH: `python -m align` must not
        # put the working directory first on sys.path — run from a clone of align's repository, the workers would
        # import its bare align/ folder (no align.stages) instead of the installed package
        # HELD_ENV: this process holds the output's writer lock while the workers run; rank 0 writes under it
        from align.integrity import HELD_ENV, held

        saved = {k: os.environ.get(k) for k in (LAUNCHED_BY_ALIGN, "PYTHONSAFEPATH", HELD_ENV)}
        os.environ.update({LAUNCHED_BY_ALIGN: "1", "PYTHONSAFEPATH": "1", HELD_ENV: os.pathsep.join(held())})
        try:
            launch_command(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # the launchers raise CalledProcessError / torch's ChildFailedError with the exit codes
            if type(e).__name__ == "SignalException":  # torchrun's agent, interrupted (Ctrl-C): it stopped the workers
                raise KeyboardInterrupt from None
            code = worker_exit_code(e)
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    if code == 2:
        raise WorkersRefused()
    if code:
        raise RuntimeError(f"align {stage}: a worker process failed (exit {code}); its traceback is above.")


def worker_exit_code(error: Exception) -> int:
    failures: dict[Any, Any] = getattr(error, "failures", {}) or {}
    codes = [getattr(f, "exitcode", 1) for f in failures.values()] or [getattr(error, "returncode", 1)]
    return 2 if 2 in codes else max(codes)


class WorkersRefused(AlignError):
    """The workers exited 2: rank 0 already printed the user error."""

    silent = True

    def __init__(self):
        super().__init__("the launched processes refused the configuration; their error is printed above.")


def wait_for_everyone() -> None:
    """A barrier across the launched processes (nothing to wait for in one process)."""
    if launched() and world_size() > 1:
        state().wait_for_everyone()


def state():
    """accelerate's PartialState, on CPU when there is no GPU (gloo), so TRL's trainers join the same group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())

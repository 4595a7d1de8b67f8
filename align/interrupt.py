"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (how spot instances and schedulers preempt) without losing
work.

While a stage trains (`GracefulStop`), the first signal only sets a flag: the optimizer step in progress finishes,
the stage saves a checkpoint at that step (TRL stages: `StopCallback` asks the Trainer to save and stop; ppo's loop
checks the flag after each step), marks run.json `interrupted` and raises `Interrupted`; the CLI prints one line
naming the checkpoint and exits 130 (SIGINT) or 143 (SIGTERM), without a traceback. `--resume` continues from that
checkpoint exactly.

A second signal while the checkpoint is written is ignored (a checkpoint counts only once its seal is written, last
(align.integrity), and `Run.last_checkpoint` skips unsealed ones, so even a kill -9 there leaves the previous
checkpoint to resume from). A second signal before the step has finished stops at once, without a new
checkpoint. Outside training (loading, final save), SIGTERM is turned into the same `Interrupted` (exit 143) so the
manifest is marked before the process ends.

Tests stop a run at a step they choose, not after a sleep (a test's verdict must not depend on the machine's speed):
with `ALIGN_TEST_PAUSE=N:FILE` in the environment, a stage about to train step N+1 (so step N and any checkpoint of
it are complete) writes FILE and waits until FILE is removed or a signal comes (`pause_point`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; `checkpoint` (if any) holds the state at `step`. A KeyboardInterrupt, so code
    that handles Ctrl-C handles it too."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.step is not None and self.checkpoint is not None:
            return (f"interrupted ({name}) at step {self.step}; checkpoint saved to {self.checkpoint}; "
                    "continue with --resume")
        return f"interrupted ({name}) before a checkpoint of the current step was saved; --resume continues from " \
               "the last complete checkpoint (or starts over if there is none)"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM request a stop after the current step (see the module docstring).

    The training loop checks `agreed()` after each step, brackets its checkpoint write with `saving`, then calls `raise_if_stopped`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saving = False  # from the end of the interrupted step until the stage stops: further signals wait
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> bool:
        """`requested`, agreed across launched processes (align.launch): a signal reaches each process at its own
        moment, and all of them must save and stop after the same step. One all-reduce per step; in one process just
        the flag."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:  # another process was signalled: stop here too, as interrupted
            self.signum = signal.SIGTERM
        return bool(flag.item())

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning("%s: finishing the current step, then saving a checkpoint (send it again to stop at once, "
                           "without one).", signal.Signals(signum).name)
        elif self.saving:
            logger.warning("%s: still saving the checkpoint; it will stop right after.", signal.Signals(signum).name)
        else:
            raise Interrupted(signum)

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def raise_if_stopped(self, step: int, checkpoint: Path | None) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum, step, checkpoint)

    def callback(self):
        """A transformers TrainerCallback: after the optimizer step during which a signal came, save and stop."""
        from transformers import TrainerCallback

        stop = self

        class StopCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                pause_point(state.global_step, stop)

            def on_step_end(self, args, state, control, **kwargs):
                if stop.agreed():
                    stop.saving = control.should_save = control.should_training_stop = True

        return StopCallback()


PAUSE_ENV = "ALIGN_TEST_PAUSE"


def pause_point(done_steps: int, stop: GracefulStop) -> None:
    """Test hook (see the module docstring): with ALIGN_TEST_PAUSE=N:FILE and `done_steps` == N, write FILE (this
    process's id) and wait until FILE is removed or a signal is requested."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    step, _, path = spec.partition(":")
    if int(step) != done_steps:
        return
    marker = Path(path)
    marker.write_text(str(os.getpid()))
    while marker.exists() and not stop.requested:
        time.sleep(0.02)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


class TermAsInterrupt:
    """Context manager for a whole command: SIGTERM raises `Interrupted` (like Ctrl-C raises KeyboardInterrupt), so
    a run's manifest is marked and the exit code is 143 instead of a silent kill."""

    def __enter__(self) -> TermAsInterrupt:
        self._previous = signal.signal(signal.SIGTERM, _raise_interrupted) if _in_main_thread() else None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

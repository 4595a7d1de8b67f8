"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

- `offline()`: environment for running with no network and quiet logs.
- `align_steps(...)`: several `align ...` setup commands (not measured) in one fresh process.
- `StepProbe`: records, for every optimizer step of a Trainer, the wall-clock time of `on_step_begin` and
  `on_step_end`, and the non-pad / trained tokens of the batch. `install_probe()` hooks it into *every*
  Trainer built afterwards (through transformers' CallbackHandler and Trainer.training_step), so the align
  side and the plain-TRL side are instrumented by the same code, without touching align.
  It also samples the machine's total busy CPU time (/proc/stat) and this process's CPU time at every step, so a
  run can tell how much CPU *other* processes took while it ran (`foreign_cpu`): on a shared 2-core machine a
  second busy process makes torch's two OpenMP threads wait on each other and single steps take seconds, which
  would swamp the differences measured here. The benchmarks repeat such runs.
- `write_results()`, `table()`: JSON results in bench/results/ and a small text table.
- Smoke mode (`add_smoke_flag`, `smoke_mode`, `smoke_check`): every bench takes `--smoke` (tiny sizes, one round, a
  couple of steps) and tests/test_bench.py runs it, so a bench that breaks fails the test suite. In smoke mode
  (an environment variable, so the workers a bench starts inherit it) `wait_quiet` returns at once and
  `write_results` refuses to write; the bench ends with `smoke_check`, which exits non-zero listing every side that
  did not run, or prints `smoke OK: NAME`. Nothing is timed against a limit: a smoke's verdict never depends on the
  machine's speed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SMOKE_ENV = "ALIGN_BENCH_SMOKE"  # "1": smoke mode, in this process and the workers it starts


# -- smoke mode ----------------------------------------------------------------------------------------------------
def add_smoke_flag(parser, what: str) -> None:
    """The uniform `--smoke` option; `what` says what the smoke runs."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"smoke run ({what}): writes no results, does not wait for a quiet machine, checks that "
                             "every side ran and prints 'smoke OK: <bench>' (run by tests/test_bench.py)")


def smoke_mode(on: bool = False) -> bool:
    """Turn smoke mode on (for this process and every process it starts) when `on`; whether it is on.
    A smoke runs torch on one thread (OMP_NUM_THREADS=1, inherited by workers): on a loaded machine two OpenMP
    threads wait on each other and tiny steps take seconds."""
    if on:
        os.environ[SMOKE_ENV] = "1"
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
    return os.environ.get(SMOKE_ENV) == "1"


def smoke_check(name: str, checks: dict[str, bool]) -> None:
    """End of a smoke run: `checks` maps what must hold ("align side logged step times") to whether it does.
    Exits with every failed one listed, or prints `smoke OK: NAME`."""
    failed = [what for what, ok in checks.items() if not ok]
    if failed:
        raise SystemExit(f"smoke FAILED: {name}: " + "; ".join(failed))
    print(f"smoke OK: {name}", flush=True)


def finite(*values) -> bool:
    """All values are numbers (not None, not NaN, not infinite)."""
    import math

    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def align_steps(*commands) -> None:
    """Run the `align` commands (each a list of arguments) one after the other in ONE fresh process: the setup steps
    that are not measured (sft / rm / merge of the parents) pay for one interpreter start, not one each. Not in this
    process: a child's ru_maxrss starts at its parent's RSS, so a bench that measures children must stay small.
    Exits with the failing command's output when one fails."""
    import subprocess

    code = ("import json, sys\nfrom align.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
            "    print('$ align', *argv, flush=True)\n    code = main(argv)\n    if code:\n        sys.exit(code)")
    argv = [[str(a) for a in command] for command in commands]
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        ran = [line for line in proc.stdout.splitlines() if line.startswith("$ align")]
        raise SystemExit(f"{ran[-1] if ran else 'align'} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("align").setLevel(logging.ERROR)


@dataclass
class StepProbe:
    """Per-step timestamps, CPU samples and token counts of one training run.

    With a `baton` (see `PipeBaton`), the run only trains while it has the turn and hands it over every
    `baton.block` steps, at `on_step_begin`; each stretch of `block` steps it runs is recorded in `blocks`.
    """

    pad_token_id: int
    abort_above: float | None = None  # stop training early once other processes use more cores than this
    baton: PipeBaton | None = None
    name: str = ""
    aborted: bool = False
    begin: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)      # non-pad input tokens (attended)
    trained_tokens: list[int] = field(default_factory=list)   # tokens with a label (!= -100)
    examples: list[int] = field(default_factory=list)         # examples (sequences) in the batch
    rows: list[int] = field(default_factory=list)             # rows of the batch tensor
    slots: list[int] = field(default_factory=list)            # rows x width (computed positions, pad included)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # at on_step_end: (machine busy s, own cpu s)
    blocks: list[dict] = field(default_factory=list)          # with a baton: {"first_step", "steps", "s", "foreign"}
    _block: tuple[int, float, tuple[float, float]] | None = None

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class _Probe(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if probe.baton is not None:
                    probe._baton_step()
                probe.begin.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                probe.end.append(time.perf_counter())
                probe.cpu.append(cpu_seconds())
                if probe.abort_above is not None and probe.contended_lately():
                    probe.aborted = True
                    control.should_training_stop = True

            def on_train_end(self, args, state, control, **kwargs):
                if probe.baton is not None:
                    probe.baton.finish(probe.name)

        return _Probe()

    def _baton_step(self) -> None:
        """At on_step_begin: after `block` steps, close the block and hand the turn over; then open the next."""
        step = len(self.begin)  # steps begun so far
        record = None
        if self._block is None:
            self.baton.ready(self.name)
        else:
            first, t0, cpu0 = self._block
            if step - first < self.baton.block:
                return
            t1, cpu1 = time.perf_counter(), cpu_seconds()
            record = {"first_step": first, "steps": step - first, "s": t1 - t0,
                      "foreign": max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (t1 - t0)}
            self.blocks.append(record)
        self.baton.hand_over(self.name, record)
        self._block = (step, time.perf_counter(), cpu_seconds())

    def contended_lately(self, window: float = 2.0) -> bool:
        """Did other processes use more than `abort_above` cores over (at least) the last `window` seconds?"""
        i = len(self.end) - 1
        j = i
        while j > 0 and self.end[i] - self.end[j] < window:
            j -= 1
        if self.end[i] - self.end[j] < window:
            return False
        (b0, o0), (b1, o1) = self.cpu[j], self.cpu[i]
        return (b1 - b0) - (o1 - o0) > self.abort_above * (self.end[i] - self.end[j])

    def count(self, inputs) -> None:
        ids = inputs["input_ids"]
        self.real_tokens.append(int((ids != self.pad_token_id).sum()))
        self.trained_tokens.append(int((inputs["labels"] != -100).sum()))
        self.rows.append(int(ids.shape[0]))
        self.slots.append(int(ids.numel()))
        if "position_ids" in inputs and "attention_mask" not in inputs:
            # packed rows: an example starts wherever position_ids == 0 and the token is not padding
            starts = (inputs["position_ids"] == 0) & (ids != self.pad_token_id)
            self.examples.append(int(starts.sum()))
        else:
            self.examples.append(int(ids.shape[0]))

    def step_foreign(self, i: int) -> float:
        """Cores' worth of CPU other processes used during step interval i (on_step_end i-1 -> on_step_end i)."""
        (b0, o0), (b1, o1) = self.cpu[i - 1], self.cpu[i]
        return max(0.0, (b1 - b0) - (o1 - o0)) / (self.end[i] - self.end[i - 1])

    # -- summary. Step interval i runs from on_step_end of step i-1 to on_step_end of step i (collation, forward,
    #    backward, optimizer, logging callbacks); the first `warmup` steps are skipped, and so is the final
    #    checkpoint / adapter save, which comes after the last on_step_end. With `max_foreign`, intervals in which
    #    other processes used more than that many cores are left out (`clean_*`). --
    def steady(self, warmup: int, max_foreign: float | None = None) -> dict:
        n = len(self.end)
        if warmup < 1 or n <= warmup + 1:
            raise RuntimeError(f"{n} steps recorded; need warmup >= 1 and more than warmup + 1 steps")
        span = self.end[-1] - self.end[warmup - 1]
        steps = n - warmup
        compute = [e - b for b, e in zip(self.begin[warmup:], self.end[warmup:], strict=True)]
        wall = [self.end[i] - self.end[i - 1] for i in range(warmup, n)]
        (busy0, own0), (busy1, own1) = self.cpu[warmup - 1], self.cpu[-1]
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0))
        real = sum(self.real_tokens[warmup:n])
        trained = sum(self.trained_tokens[warmup:n])
        out = {
            "steps": steps,
            "seconds": span,
            "steps_per_s": steps / span,
            "median_step_wall_ms": 1000 * statistics.median(wall),
            "median_step_compute_ms": 1000 * statistics.median(compute),
            "real_tokens": real,
            "trained_tokens": trained,
            "real_tokens_per_s": real / span,
            "trained_tokens_per_s": trained / span,
            "examples_per_step": statistics.mean(self.examples[warmup:n]),
            "padding_fraction": 1 - real / sum(self.slots[warmup:n]),
            "foreign_cpu": foreign / span,  # cores' worth of CPU used by other processes meanwhile (0 = quiet)
        }
        if max_foreign is not None:
            clean = [i for i in range(warmup, n) if self.step_foreign(i) <= max_foreign]
            secs = sum(self.end[i] - self.end[i - 1] for i in clean)
            out.update({
                "clean_steps": len(clean),
                "clean_seconds": secs,
                "clean_steps_per_s": len(clean) / secs if secs else float("nan"),
                "clean_real_tokens_per_s": sum(self.real_tokens[i] for i in clean) / secs if secs else float("nan"),
                "clean_trained_tokens_per_s": (sum(self.trained_tokens[i] for i in clean) / secs
                                               if secs else float("nan")),
            })
        return out


class PipeBaton:
    """Turn-taking between training runs in separate worker processes, driven by the parent over a Pipe
    (`multiprocessing.connection.Connection`). The worker's probe calls `ready` at its first step, then
    `hand_over` every `block` steps: it reports the finished block and blocks (no CPU) until the parent says
    "go". The parent lets the runs take turns (see bench/sft_overhead.py)."""

    def __init__(self, conn, block: int):
        self.conn, self.block = conn, block

    def ready(self, me: str) -> None:
        self.conn.send(("ready", me))

    def hand_over(self, me: str, block: dict | None = None) -> None:
        if block is not None:
            self.conn.send(("block", block))
        message = self.conn.recv()
        if message != "go":
            raise RuntimeError(f"{me}: unexpected message from the parent: {message!r}")

    def finish(self, me: str) -> None:
        pass  # the worker reports "done" itself once its run has returned


def wait_quiet(max_foreign: float = 0.1, window: float = 1.0, need: int = 3, timeout: float = 120.0) -> float:
    """Wait (up to `timeout` s) until other processes use at most `max_foreign` cores for `need` windows in a row.
    Returns the seconds waited (0 at once in smoke mode)."""
    if smoke_mode():
        return 0.0
    start = time.perf_counter()
    quiet = 0
    while quiet < need and time.perf_counter() - start < timeout:
        (b0, o0) = cpu_seconds()
        time.sleep(window)
        (b1, o1) = cpu_seconds()
        quiet = quiet + 1 if (b1 - b0) - (o1 - o0) <= max_foreign * window else 0
    return time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


_CURRENT = threading.local()  # .probe: the StepProbe of the Trainer(s) created / training in this thread


def install_probe() -> None:
    """Make every Trainer created from now on report to the probe that `use_probe` set in the creating thread
    (idempotent)."""
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    if getattr(CallbackHandler, "_bench_probe", False):
        return
    original_init = CallbackHandler.__init__
    original_step = Trainer.training_step

    def init(self, callbacks, *args, **kwargs):
        probe = getattr(_CURRENT, "probe", None)
        callbacks = list(callbacks) + ([probe.callback()] if probe is not None else [])
        original_init(self, callbacks, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        probe = getattr(_CURRENT, "probe", None)
        if probe is not None:
            probe.count(inputs)
        return original_step(self, model, inputs, *args, **kwargs)

    CallbackHandler.__init__ = init
    Trainer.training_step = training_step
    CallbackHandler._bench_probe = True


def use_probe(probe: StepProbe | None) -> None:
    _CURRENT.probe = probe


def machine() -> dict:
    import torch
    import transformers
    import trl

    import align

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "align": align.__version__,
    }


def write_results(name: str, data: dict) -> Path:
    if smoke_mode():
        raise RuntimeError(f"a smoke run writes no results (bench/results/{name}.json left alone)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def fmt(x) -> str:
    if not isinstance(x, float):
        return str(x)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# The tiny model's ChatML template (align.tiny.CHAT_TEMPLATE) with TRL's generation markers around what the
# assistant turn adds: its content and the end-of-turn marker.
TRL_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

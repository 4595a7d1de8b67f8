"""Calling reward functions safely: faults are never silent.

`GuardedReward` wraps a resolved reward with TRL's calling convention (so it can go straight into a TRL
trainer's `reward_funcs`) and checks every call:
- an exception: re-run sample by sample to find the first failing one, then raise RewardError naming the
  function, the sample index and prompt, and the original exception (its traceback is chained);
- a wrong-length result, a non-number, NaN/inf: RewardError naming the function and the sample;
- a call slower than `timeout` seconds (sync functions run in a worker thread, async ones under wait_for).
With `on_fault="skip"` the faulty samples get None (the reward is "not applicable" there) and a warning is
logged with the count; the run goes on. Async reward functions are awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import threading
import time
from typing import Any

from align.errors import AlignError
from align.rewards.call import per_sample
from align.rewards.registry import Reward

logger = logging.getLogger(__name__)


class RewardError(AlignError):
    """A reward function misbehaved; the message names the function and the sample."""


def _preview(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else " ".join(m.get("content", "") for m in prompt)
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


class GuardedReward:
    def __init__(self, reward: Reward, timeout: float | None = 60.0, on_fault: str = "raise"):
        self.reward = reward
        self.timeout = timeout
        self.on_fault = on_fault
        self.__name__ = reward.name or getattr(reward.fn, "__name__", "reward")
        self.seconds = 0.0  # time spent in the function (for `align rewards check` and logging)
        self.calls = 0

    # -- invoking ----------------------------------------------------------------------------------------
    def _invoke(self, prompts: list, completions: list, columns: dict[str, Any]) -> Any:
        try:
            return self._run(prompts, completions, columns)
        except SystemExit as e:  # never a silent end of the run: a bug in the reward, named as one
            self._fault(f"(spec '{self.reward.spec}') called sys.exit({e.code!r}) on a batch of {len(prompts)} samples (first prompt "
                        f"{_preview(prompts[0]) if prompts else '-'}); a reward function must return its scores (or "
                        "raise), not end the process.")

    def _run(self, prompts: list, completions: list, columns: dict[str, Any]) -> Any:
        fn = self.reward.fn
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            coro = fn(prompts=prompts, completions=completions, **columns)
            return asyncio.run(asyncio.wait_for(coro, self.timeout) if self.timeout else coro)
        if not self.timeout:
            return fn(prompts=prompts, completions=completions, **columns)
        return call_with_timeout(fn, self.timeout, prompts=prompts, completions=completions, **columns)

    def _fault(self, message: str, cause: BaseException | None = None) -> None:
        error = RewardError(f"Reward function '{self.__name__}' {message}")
        if cause is not None:
            raise error from cause
        raise error

    def _locate(self, prompts: list, completions: list, columns: dict[str, Any], batch_error: Exception) -> list:
        """Re-run each sample alone; return per-sample results with None where it fails (or raise)."""
        out = []
        for i in range(len(prompts)):
            one = per_sample(columns, len(prompts), i, i + 1)
            try:
                out.extend(self._invoke(prompts[i : i + 1], completions[i : i + 1], one))
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001 - reported with its sample, or skipped by the user's choice
                if self.on_fault != "skip":
                    self._fault(f"raised {type(e).__name__}: {e} on sample {i} (prompt {_preview(prompts[i])}).", e)
                out.append(None)
        if self.on_fault != "skip":  # failed as a batch but not alone
            self._fault(f"raised {type(batch_error).__name__}: {batch_error} on the batch of {len(prompts)} "
                        "samples (each sample alone succeeds).", batch_error)
        return out

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        start = time.perf_counter()
        try:
            result = self._invoke(prompts, completions, columns)
        except (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError):
            if self.on_fault == "skip":
                logger.warning("Reward '%s' timed out after %ss on %d samples; skipped them.", self.__name__,
                               self.timeout, len(prompts))
                return [None] * len(prompts)
            self._fault(f"timed out after {self.timeout}s on a batch of {len(prompts)} samples (first prompt "
                        f"{_preview(prompts[0])}). Speed it up or raise the timeout.")
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - located and re-raised with its sample
            result = self._locate(prompts, completions, columns, e)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        return self._check(result, prompts)

    # -- validating --------------------------------------------------------------------------------------
    def _check(self, result: Any, prompts: list) -> list[float | None]:
        if not isinstance(result, (list, tuple)) or len(result) != len(prompts):
            size = len(result) if isinstance(result, (list, tuple)) else type(result).__name__
            if self.on_fault == "skip":
                logger.warning("Reward '%s' returned %s values for %d samples; skipped them.", self.__name__,
                               size, len(prompts))
                return [None] * len(prompts)
            self._fault(f"returned {size} values for {len(prompts)} samples; it must return a list with one "
                        "float (or None) per completion.")
        out: list[float | None] = []
        for i, value in enumerate(result):
            if value is None:
                out.append(None)
                continue
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            if bad and self.on_fault == "skip":
                out.append(None)
            elif bad:
                self._fault(f"returned {value!r} for sample {i} (prompt {_preview(prompts[i])}); expected a "
                            "finite float or None.")
            else:
                out.append(float(value))
        skipped = sum(v is None for v in out) - sum(v is None for v in result)
        if skipped:
            logger.warning("Reward '%s': %d invalid value(s) skipped.", self.__name__, skipped)
        return out


def call_with_timeout(fn, timeout: float, **kwargs: Any) -> Any:
    """`fn(**kwargs)` in a daemon thread; TimeoutError after `timeout` seconds. A thread cannot be stopped, but a
    daemon thread does not keep the process alive: a hung reward ends with the run, not when it returns (a
    ThreadPoolExecutor's worker is joined at exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(fn(**kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    threading.Thread(target=work, name="align-reward", daemon=True).start()
    return future.result(timeout)


def guard_all(specs: list[str], timeout: float | None = 60.0, on_fault: str = "raise") -> list[GuardedReward]:
    """Resolve reward specs (align.rewards.registry) and guard each one."""
    from align.rewards.registry import resolve_rewards

    return [GuardedReward(r, timeout=timeout, on_fault=on_fault) for r in resolve_rewards(specs)]


def weighted_total(scores: list[list[float | None]], weights: list[float]) -> list[float]:
    """Per-sample Σ weight·score over the functions that apply (None = not applicable, counts 0)."""
    return [sum(w * s for w, s in zip(weights, sample, strict=True) if s is not None) for sample in zip(*scores, strict=True)]

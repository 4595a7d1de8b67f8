"""Resolve reward specs into callables.

A spec is `SOURCE[(key=value, ...)][@weight]`, where SOURCE is one of
- a built-in name (align.rewards.builtin: accuracy, format, length),
- a name registered by an installed package under the entry-point group `align.rewards`,
- `path/to/file.py:function`,
- `package.module:function`,
- a reward-model run directory (from `align rm`; `RUN(head="NAME")` picks one output of a several-head pointwise RM).
With parentheses the source is a factory, called with the settings inside them (`pkg.mod:make()` calls it with
none) to make the reward function; built-ins always are. The weight defaults to 1.0. Unknown names list the
available ones.

Each reward is named after the function the spec names (`accuracy`, `get_soft_overlong_punishment`, `my_fn` for
`file.py:my_fn`, `reward_model:RUN` for a reward-model run), with `_2`, `_3` ... when two specs name the same one;
metrics use these names (`rewards/accuracy/mean`), run.json keeps each name with its spec and weight.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from align.errors import AlignError, unknown_name
from align.rewards.builtin import BUILTINS

GROUP = "align.rewards"


@dataclass
class Reward:
    """A resolved reward: the function, its weight, and the spec it came from."""

    fn: Any
    weight: float = 1.0
    spec: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # set by resolve_rewards: the named function, deduplicated

    def describe(self) -> dict[str, Any]:
        """What run.json records of this reward."""
        return {"name": self.name, "spec": self.spec, "weight": self.weight}


def registered() -> dict[str, Any]:
    """Entry points of group `align.rewards` (name -> EntryPoint)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    return sorted({*BUILTINS, *registered()})


def split_spec(spec: str) -> tuple[str, dict[str, Any] | None, float]:
    """`source(k=v)@w` -> (source, settings, weight); settings is None without parentheses."""
    source, weight = spec, 1.0
    head, at, tail = spec.rpartition("@")
    if at:
        try:
            weight = float(tail)
        except ValueError:
            raise AlignError(f"Reward spec '{spec}': the weight after '@' must be a number, got '{tail}'.") from None
        if not math.isfinite(weight):
            raise AlignError(f"Reward spec '{spec}': the weight after '@' must be a finite number, got '{tail}'.")
        source = head
    settings: dict[str, Any] | None = None
    if source.endswith(")") and "(" in source:
        source, _, args = source[:-1].partition("(")
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            settings = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            if call.args:
                raise ValueError("positional settings")
        except (SyntaxError, ValueError) as e:
            raise AlignError(f"Reward spec '{spec}': settings must be key=value literals, e.g. "
                             f"length(max_length=64) ({e}).") from None
    return source.strip(), settings, weight


def _load_file(path: Path, attr: str, spec: str, kind: str = "reward"):
    if not path.is_file():
        raise AlignError(f"{kind.capitalize()} spec '{spec}': no such file {path}.")
    name = f"align_user_{kind}s_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise AlignError(f"{e.filename or path}:{e.lineno}: syntax error in {kind} file ({e.msg}): "
                         f"{(e.text or '').strip()!r}. Fix that line.") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed at import: named, not hidden
        sys.modules.pop(name, None)
        raise import_failed(spec, str(path), e, kind) from e
    return _attr(module, attr, spec, str(path), kind)


def import_failed(spec: str, where: str, error: BaseException, kind: str = "reward") -> AlignError:
    """The error for a reward (tool, environment) module that raised (or called sys.exit) while it was imported: the
    spec, the error and the line of the user's code it came from."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    what = f"called sys.exit({error.code!r})" if isinstance(error, SystemExit) else \
        f"raised {type(error).__name__}: {error}"
    return AlignError(f"{kind.capitalize()} spec '{spec}': importing {where} {what}{at}. A {kind} module must import "
                      "cleanly; fix it (run `python -c 'import ...'` to see the full traceback).")


def _attr(module, attr: str, spec: str, where: str, kind: str = "reward"):
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise AlignError(f"{kind.capitalize()} spec '{spec}': {where} has no '{attr}'. Callables there: "
                         f"{', '.join(public) or '(none)'}.")
    return getattr(module, attr)


def is_reward_model(obj: Any) -> bool:
    from align.rewards.reward_model import RewardModelScorer

    return isinstance(obj, RewardModelScorer)


def load_named(source: str, spec: str, kind: str, builtins: dict[str, Any], group: str, hint: str):
    """The object a plugin spec's source names: `path/file.py:attr`, `package.module:attr`, a built-in, or an entry
    point of `group`. Shared by rewards, tools and environments (align.rewards.tools); `kind` names the plugin in the
    messages, `hint` ends the unknown-name message."""
    if ":" in source:
        target, _, attr = source.rpartition(":")
        if target.endswith(".py") or "/" in target:
            return _load_file(Path(target), attr, spec, kind)
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name is not None and not target.startswith(e.name):  # the module imports something missing
                raise import_failed(spec, f"module '{target}'", e, kind) from e
            raise AlignError(f"{kind.capitalize()} spec '{spec}': cannot import module '{target}' ({e}).") from None
        except SyntaxError as e:
            raise AlignError(f"{e.filename}:{e.lineno}: syntax error in module '{target}' ({e.msg}). Fix that line.") \
                from None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed at import: named, not hidden
            raise import_failed(spec, f"module '{target}'", e, kind) from e
        return _attr(module, attr, spec, f"module {target}", kind)
    if source in builtins:
        return builtins[source]
    eps = {ep.name: ep for ep in entry_points(group=group)}
    if source in eps:
        try:
            return eps[source].load()
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a broken plugin package: named, not hidden
            raise import_failed(spec, f"entry point '{source}' ({eps[source].value})", e, kind) from e
    raise AlignError(f"{kind.capitalize()} spec: " + unknown_name(kind, source, sorted({*builtins, *eps})) + hint)


def resolve_source(source: str, spec: str, settings: dict[str, Any] | None = None):
    """The object a spec's source names (a function, a factory, or a reward-model scorer; a reward model takes one
    setting, `head=NAME`, the output of a several-head pointwise RM to use)."""
    if (Path(source) / "run.json").is_file():
        from align.rewards.reward_model import RewardModelScorer

        if set(settings or {}) - {"head"}:
            raise AlignError(f"Reward spec '{spec}': a reward-model run takes one setting, head=\"NAME\" (the output of a "
                             f"several-head pointwise RM), got {', '.join(sorted(settings))}.")
        return RewardModelScorer(source, head=(settings or {}).get("head"))
    return load_named(source, spec, "reward", BUILTINS, GROUP,
                      " Or give path/to/file.py:function, package.module:function, or a reward-model run.")


def takes_completions(fn: Any) -> bool:
    """Whether fn can be called as a reward (a `completions` parameter or **kwargs); True when unknowable."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "completions" or p.kind is p.VAR_KEYWORD for p in params)


def base_name(source: str, obj: Any) -> str:
    """The name a reward is known by: the function (or factory) the spec names; a reward model's own name."""
    from align.rewards.reward_model import RewardModelScorer

    if isinstance(obj, RewardModelScorer):
        return obj.__name__
    return source.rpartition(":")[2] if ":" in source else source


def resolve_reward(spec: str) -> Reward:
    source, settings, weight = split_spec(spec)
    obj = resolve_source(source, spec, settings)
    name = base_name(source, obj)
    if (settings is not None or source in BUILTINS) and not is_reward_model(obj):
        try:
            obj = obj(**(settings or {}))
        except (TypeError, ValueError) as e:
            raise AlignError(f"Reward spec '{spec}': bad settings for '{source}': {e}.") from None
    if not callable(obj):
        raise AlignError(f"Reward spec '{spec}': '{source}' is a {type(obj).__name__}, not a function.")
    if not takes_completions(obj):
        raise AlignError(f"Reward spec '{spec}': '{source}' does not take the reward call (prompts, completions, "
                         f"**kwargs). If it is a factory that makes the reward function, call it: '{source}()' or "
                         f"'{source}(setting=value)'.")
    return Reward(obj, weight, spec, settings or {}, name)


def resolve_each(specs: list[str], resolve, problems: list[str]) -> list:
    """`resolve(spec)` for every spec; each AlignError's message goes to `problems`, so all are reported together
    (rewards here, tools and environments in align.rewards.tools)."""
    resolved = []
    for spec in specs:
        try:
            resolved.append(resolve(spec))
        except AlignError as e:
            problems.append(str(e))
    return resolved


def resolve_rewards(specs: list[str]) -> list[Reward]:
    """Resolve every spec and name each reward (deduplicated); all problems are reported together."""
    problems: list[str] = []
    rewards = resolve_each(specs, resolve_reward, problems)
    if problems:
        raise AlignError("Invalid reward spec(s):", problems)
    seen: dict[str, int] = {}
    for r in rewards:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return rewards

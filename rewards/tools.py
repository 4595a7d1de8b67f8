"""Tools and environments for multi-turn rollouts: plugins resolved exactly like rewards (align.rewards.registry).

    --tool SPEC          a typed Python function with a Google-style docstring (`Args:` naming every parameter).
                         Its JSON schema comes from its signature and docstring through transformers'
                         `get_json_schema` — the schema chat templates take as `tools=`. SPEC: a built-in name,
                         an entry point of group `align.tools`, `path/to/file.py:fn` or `package.module:fn`.
    --environment SPEC   a class (or factory) whose public methods are tools (same rules as a tool function, `self`
                         aside) and which keeps state per rollout: one instance is made for each rollout and its
                         methods are that rollout's tools. SPEC as for a tool; entry-point group `align.environments`.
                         `reset` and `get_reward` are not tools (TRL's environment protocol names them); rewards
                         receive each rollout's instance as the `environments` keyword (TRL's name for it).

Built-in tools:
    calculator(expression)   exact arithmetic on integers and decimals: + - * / // % ** (exponents up to 64,
                             powers up to 2**4096), unary minus and parentheses, parsed with `ast` (never `eval`);
                             an error string for anything else ("12 * 3" -> "36", "7 / 2" -> "3.5").

A tool call is guarded (`call_tool`): it runs in a daemon thread with a deadline (`--tool-timeout`), so a hung tool
never hangs the rollout; an exception, a timeout, an unknown tool or bad arguments, and a result that is neither a
string nor JSON-serialisable all become an error string in the `tool` message the model reads next, and are counted
(`ToolStats`: calls, errors, timeouts). Nothing a tool does stops training.

Bad specs (unknown names, missing files, objects without type hints or docstrings, classes without public methods)
are refused at validation with an AlignError naming the spec and the fix, every problem at once.
"""

from __future__ import annotations

import ast
import concurrent.futures
import inspect
import json
import math
import operator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from align.errors import AlignError
from align.rewards.registry import load_named, resolve_each

TOOL_GROUP = "align.tools"
ENVIRONMENT_GROUP = "align.environments"
NOT_TOOLS = ("reset", "get_reward")  # TRL's environment protocol: lifecycle methods, not tools


# -- the built-in calculator ---------------------------------------------------------------------------------------
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_EXPONENT = 64


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or
                                             (abs(left) > 1 and abs(right) * math.log2(abs(left)) > 4096)):
            raise ValueError(f"{left} ** {right} is too large (exponents up to {MAX_EXPONENT}, results up to 2**4096)")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"unsupported element {ast.unparse(node)!r}: use numbers, + - * / // % ** and parentheses")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The expression, e.g. "12345 * 678": numbers, + - * / // % **, unary minus and parentheses.
    """
    try:
        value = _evaluate(ast.parse(expression.replace(",", "").strip(), mode="eval"))
    except SyntaxError:
        return f"error: cannot parse {expression!r} as arithmetic"
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return str(value)


BUILTIN_TOOLS: dict[str, Any] = {"calculator": calculator}
BUILTIN_ENVIRONMENTS: dict[str, Any] = {}


# -- resolving specs -----------------------------------------------------------------------------------------------
def schema_of(fn: Any, spec: str) -> dict[str, Any]:
    """The JSON schema chat templates take for `fn` (transformers' get_json_schema), or an AlignError saying what the
    function lacks."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - DocstringParsingException / TypeHintParsingException: the user's to fix
        raise AlignError(f"Tool spec '{spec}': no JSON schema for '{getattr(fn, '__name__', fn)}' ({e}). A tool needs "
                         "a type hint on every parameter and a docstring with an `Args:` section describing each "
                         "one (transformers' get_json_schema).") from None


def resolve_tool(spec: str) -> Any:
    """The function a --tool spec names, checked to have a schema."""
    fn = load_named(spec.strip(), spec, "tool", BUILTIN_TOOLS, TOOL_GROUP,
                    " Or give path/to/file.py:function or package.module:function.")
    if not callable(fn) or inspect.isclass(fn):
        raise AlignError(f"Tool spec '{spec}': '{spec}' is a {type(fn).__name__}, not a function (a class with "
                         "tool methods is an --environment).")
    schema_of(fn, spec)
    return fn


def environment_tools(instance: Any) -> dict[str, Any]:
    """An environment instance's tools: its public methods, `reset` and `get_reward` aside."""
    return {name: getattr(instance, name) for name, _ in inspect.getmembers(type(instance), callable)
            if not name.startswith("_") and name not in NOT_TOOLS}


def resolve_environment(spec: str) -> Any:
    """The factory an --environment spec names; one instance is made here to check its tools."""
    factory = load_named(spec.strip(), spec, "environment", BUILTIN_ENVIRONMENTS, ENVIRONMENT_GROUP,
                         " Or give path/to/file.py:Class or package.module:Class.")
    if not callable(factory):
        raise AlignError(f"Environment spec '{spec}': a {type(factory).__name__} is not a class or factory.")
    try:
        probe = factory()
    except Exception as e:  # noqa: BLE001 - the user's constructor: named, not hidden
        raise AlignError(f"Environment spec '{spec}': making an instance raised {type(e).__name__}: {e}. It is "
                         "called with no arguments once per rollout; fix the constructor.") from e
    tools = environment_tools(probe)
    if not tools:
        raise AlignError(f"Environment spec '{spec}': {type(probe).__name__} has no public methods, so it offers no "
                         "tools. Define methods (typed, with an `Args:` docstring) the model may call.")
    for name, method in tools.items():
        schema_of(method, f"{spec}.{name}")
    return factory


@dataclass
class ToolSet:
    """The resolved --tool functions and --environment factory; `for_rollout()` gives one rollout's tools."""

    tools: list[Any] = field(default_factory=list)
    environment: Any = None  # a factory (class) or None
    timeout: float = 10.0

    @classmethod
    def resolve(cls, tool_specs: list[str], environment: str | None, timeout: float = 10.0) -> ToolSet:
        """Resolve every spec; all problems are reported together."""
        problems: list[str] = []
        tools = resolve_each(tool_specs, resolve_tool, problems)
        factory = next(iter(resolve_each([environment] if environment else [], resolve_environment, problems)), None)
        names = [t.__name__ for t in tools]
        if factory is not None and not problems:
            names += list(environment_tools(factory()))
        if len(set(names)) < len(names):
            problems.append(f"Two tools share a name ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))}); "
                            "the model calls tools by name, so each name must be unique.")
        if problems:
            raise AlignError("Invalid tool/environment spec(s):", problems)
        return cls(tools, factory, timeout)

    def for_rollout(self) -> Rollout:
        """One rollout's tools: the functions, plus the methods of a fresh environment instance."""
        environment = self.environment() if self.environment is not None else None
        tools = {t.__name__: t for t in self.tools}
        if environment is not None:
            tools.update(environment_tools(environment))
        return Rollout(tools, environment, self.timeout)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools' JSON schemas, for the chat template's `tools=` (the same for every rollout)."""
        return [schema_of(fn, name) for name, fn in self.for_rollout().tools.items()]


@dataclass
class ToolStats:
    calls: int = 0
    errors: int = 0  # exceptions, unknown tools, bad arguments, unparsable calls, garbage results
    timeouts: int = 0

    def add(self, other: ToolStats) -> None:
        self.calls, self.errors, self.timeouts = (self.calls + other.calls, self.errors + other.errors,
                                                  self.timeouts + other.timeouts)

    def metrics(self) -> dict[str, float]:
        return {"tools/calls": float(self.calls), "tools/errors": float(self.errors),
                "tools/timeouts": float(self.timeouts)}


@dataclass
class Rollout:
    """One rollout's tools (name -> callable), its environment instance (or None), the deadline per call."""

    tools: dict[str, Any]
    environment: Any
    timeout: float

    def call(self, call: dict[str, Any] | str, stats: ToolStats) -> tuple[str, str]:
        """Run one parsed tool call ({"name", "arguments"}), or report the text that did not parse; returns (tool
        name, the content of the `tool` message). Never raises, never waits past the timeout."""
        from align.rewards.guard import call_with_timeout

        stats.calls += 1
        if isinstance(call, str):
            stats.errors += 1
            return "unknown", f"error: {call}"
        name, arguments = call.get("name"), call.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # refused below, with the text
        if name not in self.tools:
            stats.errors += 1
            return str(name), f"error: unknown tool {name!r}; available: {', '.join(sorted(self.tools))}"
        if not isinstance(arguments, dict):
            stats.errors += 1
            return name, f"error: the arguments of {name} must be a JSON object, got {json.dumps(arguments)}"
        try:
            result = call_with_timeout(self.tools[name], self.timeout, **arguments)
        except (TimeoutError, concurrent.futures.TimeoutError):
            stats.timeouts += 1
            return name, f"error: {name} timed out after {self.timeout:g}s"
        except Exception as e:  # noqa: BLE001 - a tool's fault goes back to the model as its result, counted
            stats.errors += 1
            return name, f"error: {name} raised {type(e).__name__}: {e}"
        if isinstance(result, str):
            return name, result
        try:
            return name, json.dumps(result)
        except (TypeError, ValueError):
            stats.errors += 1
            return name, f"error: {name} returned a {type(result).__name__}, which is neither text nor JSON"


def parse_tool_calls(text: str) -> list[dict[str, Any] | str]:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of a model turn (Qwen2.5's format, the one
    `align tiny-model`'s chat template renders): each a dict, or a string saying why it does not parse."""
    import re

    calls: list[dict[str, Any] | str] = []
    for body in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"the tool call {body.strip()[:80]!r} is not JSON ({e.msg})")
            continue
        if not isinstance(call, dict) or "name" not in call:
            calls.append(f"the tool call {body.strip()[:80]!r} needs a \"name\" and \"arguments\"")
            continue
        calls.append(call)
    return calls


def available() -> dict[str, list[str]]:
    """Built-in and entry-point tools and environments (`align tools list`)."""
    return {"tools": sorted({*BUILTIN_TOOLS, *(ep.name for ep in entry_points(group=TOOL_GROUP))}),
            "environments": sorted({*BUILTIN_ENVIRONMENTS, *(ep.name for ep in entry_points(group=ENVIRONMENT_GROUP))})}

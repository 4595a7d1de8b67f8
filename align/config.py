"""Typed configs: dataclasses ⇄ YAML ⇄ command-line flags.

Each command has one dataclass; every field carries its help text in `metadata["help"]` (the one place it is
written). `HfArgumentParser` turns the fields into kebab-case flags (`max_steps` -> `--max-steps`); a YAML
file given with `--config` supplies defaults, and flags given on the command line win. Validation collects
every problem (YAML keys and types, config values) and raises one `AlignError` listing them all.

A numeric field declares its allowed values once, `opt(..., range="[1, inf)")` (checked with the rest, shown in
`--help`); every float must be finite and every `seed` fit numpy's range. YAML is read as UTF-8 with a loader that
refuses a key given twice. Negative numbers are values (`--lr -1e-3`), `none` sets an optional number to None. Each
config records which options the user set (`user_set`), so a default can be fitted to the model where an explicit
value is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.errors import AlignError, Problems, did_you_mean


def opt(default: Any = None, help: str = "", *, factory: Any = None, range: str | None = None, **meta: Any):
    """A config field with its help text (`meta` goes to argparse, e.g. aliases=["-o"]).

    `range` declares the values a number may take, checked at validation with every other problem: an interval such
    as "[0, 1]", "(0, inf)" or "[1, inf)" (None is always allowed where the type allows it). Every float option must
    be finite whether or not it declares a range."""
    metadata = FieldMeta(help=help, **meta)
    if range is not None:
        metadata["range"] = Range.parse(range)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class FieldMeta(dict):
    """A field's metadata. HfArgumentParser hands `metadata.copy()` to argparse's add_argument: the copy leaves out
    what is align's own (the range, shown in the help instead)."""

    OWN = ("range",)

    def copy(self) -> dict:
        out = {k: v for k, v in self.items() if k not in self.OWN}
        if "range" in self and out.get("help") is not None:
            out["help"] = f"{out['help']} [{self['range'].describe()}]"
        return out


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed / open interval of allowed values, parsed from "[lo, hi)" notation (inf for no bound)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.low_closed else '>'} {_number(self.low)}"
        return (f"in {'[' if self.low_closed else '('}{_number(self.low)}, {_number(self.high)}"
                f"{']' if self.high_closed else ')'}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SEED_RANGE = Range(0, 2**32 - 1, True, True)  # numpy's seed range (transformers' set_seed seeds numpy too)


def range_problems(cfg: Any, already: list[str]) -> list[str]:
    """Declared ranges (field metadata) and finiteness of every number in `cfg`; a field already named in a problem
    (`already`, from the config's own checks) is not reported twice."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        named = re.compile(re.escape(flag) + r"(?![\w-])")  # --lr, not --lr-scheduler
        if isinstance(value, bool) or not isinstance(value, (int, float)) or any(named.search(p) for p in already):
            continue
        allowed = f.metadata.get("range") or (SEED_RANGE if f.name == "seed" else None)
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{flag} must be a finite number, got {value}.")
        elif allowed is not None and value not in allowed:
            out.append(f"{flag} must be {allowed.describe()}, got {value}.")
    return out


@dataclasses.dataclass
class RemoteCodeOption:
    """`--trust-remote-code`: every command that loads a model takes it; nothing else turns it on (not a run's
    run.json either: a run directory is data, and loading one must not run code its manifest asks for)."""

    trust_remote_code: bool = opt(False, "Allow model code from the model directory / hub repo to run (off unless "
                                         "given; also needed to load a run trained with it).")


@dataclasses.dataclass
class Config:
    """Base of every command config: `check()` methods along the MRO add problems; `validate()` raises them.

    `positional` names a field that may also be given as the command's positional argument.
    """

    positional: ClassVar[str | None] = None

    config: str | None = opt(None, "YAML file with options (keys as in this list, snake_case); flags override it.")

    def problems(self) -> Problems:
        problems = Problems()
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("check")
            if check is not None:
                check(self, problems)
        problems.extend(range_problems(self, problems.items))
        return problems

    def validate(self) -> None:
        self.problems().raise_if_any("Invalid configuration:")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, source: str = "arguments", **kwargs: Any):
        """Build from Python keyword arguments (the Python API), checking names and types like YAML keys."""
        values = coerce_mapping(cls, kwargs, source)
        return mark_given(cls(**values), values)


def config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


GIVEN = "_given"  # instance attribute: the options the user set (YAML, flags, keyword arguments), not defaults


def mark_given(cfg: Any, names) -> Any:
    """Record which options of `cfg` the user set (so a default can be fitted to the model, an explicit value not)."""
    object.__setattr__(cfg, GIVEN, set(getattr(cfg, GIVEN, set())) | set(names))
    return cfg


def user_set(cfg: Any, name: str) -> bool:
    """Did the user set option `name` (or is its value not the default, when nothing was recorded)?"""
    given = getattr(cfg, GIVEN, None)
    if given is not None and name in given:
        return True
    field = config_fields(type(cfg)).get(name)
    return field is None or field.default is dataclasses.MISSING or getattr(cfg, name) != field.default


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def coerce_value(tp: Any, value: Any) -> Any:
    """Return `value` converted to the field type `tp`, or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args:
            try:
                return coerce_value(arg, value)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, dict):  # mapping form, e.g. columns: {prompt: question}
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce_value(item, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 1e-4 as a string
                return float(value)
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    return value


ALIASES = {"from": "from_run"}  # YAML / Python spellings of fields whose name is a Python keyword


def coerce_mapping(cls, mapping: dict[str, Any], source: str) -> dict[str, Any]:
    """Check keys and value types of `mapping` against `cls`; raise one AlignError listing every problem."""
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    problems = Problems()
    values: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        key = ALIASES.get(key, key) if key not in fields else key
        if key not in fields:
            problems.add(
                f"{source}: unknown option '{raw_key}'.{did_you_mean(key, fields)} "
                f"Run `--help` to list the options."
            )
            continue
        try:
            values[key] = coerce_value(hints[key], value)
        except ValueError:
            problems.add(f"{source}: option '{key}' must be {_type_name(hints[key])}, got {value!r}.")
    problems.raise_if_any(f"Invalid options in {source}:")
    return values


def unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be given with keys that override it
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (also on line {first}); each key may appear once in a "
                        "mapping — delete one of them", key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml_mapping(path: str | Path, what: str = "Config file", flag: str = "--config") -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} when empty); AlignError naming the file and line otherwise (syntax, a
    duplicate key, bytes that are not UTF-8)."""
    import yaml

    from align.io import read_text

    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{what} not found: {path}. Check the path given to {flag}.")
    try:
        data = yaml.load(read_text(path), Loader=unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise AlignError(f"{path}:{line}: invalid YAML: {e.problem}. Fix the syntax on that line.") from None
    except yaml.YAMLError as e:
        raise AlignError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AlignError(f"{path}: the top level must be a mapping of option: value, got {type(data).__name__}.")
    return data


def load_yaml(path: str | Path, cls) -> dict[str, Any]:
    """Read a YAML config file into checked field values for `cls`."""
    data = read_yaml_mapping(path)
    data.pop("config", None)
    return coerce_mapping(cls, data, str(path))


class ExtendList(argparse.Action):
    """A list option given several times keeps every value (`--reward a --reward b` and `--reward a b` are both
    [a, b]); its first occurrence on the command line replaces the default (a YAML value: flags override YAML)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_lists_given", set())
        current = list(getattr(namespace, self.dest) or []) if self.dest in seen else []
        seen.add(self.dest)
        setattr(namespace, self.dest, current + list(values))


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def none_or(convert):
    """An argparse type for an optional number: `none` / `null` is None, anything else `convert(text)`."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__  # argparse's "invalid int value" names it
    return parse


def build_parser(cls, parser=None, **parser_kwargs):
    """An argparse parser for `cls` (HfArgumentParser: kebab-case flags, help from field metadata)."""
    from transformers import HfArgumentParser

    if parser is None:
        parser = HfArgumentParser(cls, **parser_kwargs)
    parser._negative_number_matcher = NEGATIVE_NUMBER  # `--lr -1e-3` is a value (refused by the range check)
    hints = typing.get_type_hints(cls)
    for action in parser._actions:  # show the kebab-case spelling first (--max-steps), keep --max_steps working
        action.option_strings.sort(key=lambda o: "_" in o)
        if action.type in (int, float) and type(None) in typing.get_args(hints.get(action.dest)):
            action.type = none_or(action.type)  # `--save-total-limit none`
        if typing.get_origin(hints.get(action.dest)) is list and type(action) is argparse._StoreAction:
            action.__class__ = ExtendList  # HfArgumentParser's nargs="+" store keeps only the last occurrence
    if cls.positional:
        name = cls.positional
        is_list = typing.get_origin(typing.get_type_hints(cls)[name]) is list
        parser.add_argument("_positional", nargs="*" if is_list else "?", default=None, metavar=name.upper(),
                            help=f"same as --{name.replace('_', '-')}")
    return parser


def namespace_to_config(cls, namespace) -> Any:
    values = vars(namespace).copy()
    if values.get("_positional"):
        values[cls.positional] = values["_positional"]
    names = config_fields(cls)
    return cls(**{k: v for k, v in values.items() if k in names})


def parse_args(cls, parser, argv: list[str], sub=None):
    """Parse `argv` with `parser` into `cls`: YAML from --config first, then the flags on top.

    `sub` is the (sub)parser that owns the fields of `cls` when `parser` is a top-level dispatcher.
    """
    namespace = parser.parse_args(argv)
    given: set[str] = set()
    if getattr(namespace, "config", None):
        from_yaml = load_yaml(namespace.config, cls)
        given.update(from_yaml)
        (sub or parser).set_defaults(**from_yaml)
        namespace = parser.parse_args(argv)
    flags = (sub or parser)._option_string_actions
    given.update(flags[a.split("=")[0]].dest for a in argv if a.startswith("-") and a.split("=")[0] in flags)
    if getattr(namespace, "_positional", None) and cls.positional:
        given.add(cls.positional)
    return mark_given(namespace_to_config(cls, namespace), given)

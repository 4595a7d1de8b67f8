"""Typed configs: dataclasses ⇄ YAML ⇄ command-line flags.

Each command has one dataclass; every field carries its help text in `metadata["help"]` (the one place it is
written). `HfArgumentParser` turns the fields into kebab-case flags (`max_steps` -> `--max-steps`); a YAML
file given with `--config` supplies defaults, and flags given on the command line win. Validation collects
every problem (YAML keys and types, config values) and raises one `AlignError` listing them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.errors import AlignError, Problems, did_you_mean


def opt(default: Any = None, help: str = "", *, factory: Any = None, **meta: Any):
    """A config field with its help text (`meta` goes to argparse, e.g. aliases=["-o"])."""
    metadata = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


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
        return problems

    def validate(self) -> None:
        self.problems().raise_if_any("Invalid configuration:")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, source: str = "arguments", **kwargs: Any):
        """Build from Python keyword arguments (the Python API), checking names and types like YAML keys."""
        values = coerce_mapping(cls, kwargs, source)
        return cls(**values)


def config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


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


def read_yaml_mapping(path: str | Path, what: str = "Config file", flag: str = "--config") -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} when empty); AlignError naming the file and line otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{what} not found: {path}. Check the path given to {flag}.")
    try:
        data = yaml.safe_load(path.read_text())
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


def build_parser(cls, parser=None, **parser_kwargs):
    """An argparse parser for `cls` (HfArgumentParser: kebab-case flags, help from field metadata)."""
    from transformers import HfArgumentParser

    if parser is None:
        parser = HfArgumentParser(cls, **parser_kwargs)
    hints = typing.get_type_hints(cls)
    for action in parser._actions:  # show the kebab-case spelling first (--max-steps), keep --max_steps working
        action.option_strings.sort(key=lambda o: "_" in o)
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
    if getattr(namespace, "config", None):
        (sub or parser).set_defaults(**load_yaml(namespace.config, cls))
        namespace = parser.parse_args(argv)
    return namespace_to_config(cls, namespace)

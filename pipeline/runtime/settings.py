"""Settings objects: one dataclass per stage whose fields carry a one-line doc and what they accept
(choices, a range). The command line's options and --help (pipeline.cli), the reading of params.yaml
(pipeline.config) and docs/dvc.md's params list are derived from, or checked against, these fields."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline.runtime.errors import InputError, quote


@dataclass(frozen=True)
class Rule:
    """What a setting is for and what it accepts beyond its type."""
    doc: str
    choices: tuple | None = None
    min: float | None = None                       # inclusive bounds
    max: float | None = None
    above: float | None = None                     # exclusive bounds
    below: float | None = None
    check: Callable[[Any], str | None] | None = None   # a reason to refuse the value, or None
    option: bool = True                            # also a command-line option

    def describe(self) -> str:
        """The range in words, for --help: 'at least 1', 'above 0, below 1', ''."""
        parts = [f"{word} {_number(bound)}" for word, bound in (("at least", self.min), ("above", self.above),
                                                        ("at most", self.max), ("below", self.below))
                 if bound is not None]
        return ", ".join(parts)


def _number(bound: float) -> str:
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def setting(default, doc: str, **rule) -> Any:
    """A dataclass field with its Rule (see Rule for the keywords)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"rule": Rule(doc, **rule)})
    return dataclasses.field(default=default, metadata={"rule": Rule(doc, **rule)})


def rule(f: dataclasses.Field) -> Rule:
    return f.metadata["rule"]


def fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "rule" in f.metadata]


def keywords(settings) -> dict:
    """The fields of a settings object as keywords of the Python API (pipeline.api)."""
    return {f.name: getattr(settings, f.name) for f in fields(type(settings))}


def default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def alternatives(hint) -> tuple:
    """The types a hint allows: `int | None` -> (int, NoneType)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
             type(None): "null"}
    if typing.get_origin(hint) is list:
        return "a list of strings"
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _as(kind, value):
    """`value` as type `kind`, or None when it is not one (no lenient conversions: 10.5 is no int)."""
    if kind is type(None):
        return value if value is None else None
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is Path:
        return Path(value) if isinstance(value, (str, Path)) and str(value) else None
    if typing.get_origin(kind) is list:   # one string stands for a list of one
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
        return list(value) if ok else None
    if typing.get_origin(kind) is Literal:
        return value if value in typing.get_args(kind) else None
    raise TypeError(f"unsupported setting type {kind}")


def check_value(label: str, value, hint, r: Rule):
    """`value` checked against the type `hint` and the rule `r`; an InputError naming `label` otherwise."""
    kinds, given = alternatives(hint), value
    for kind in kinds:
        converted = _as(kind, value)
        if converted is not None or kind is type(None) and value is None:
            break
    else:
        raise InputError(f"{label} must be {' or '.join(map(_type_name, kinds))}, got {quote(value)}")
    value = converted
    if isinstance(value, list) and r.choices is not None:
        for item in value:
            if item not in r.choices:
                raise InputError(f"{label} takes {', '.join(map(str, r.choices))}, got {quote(item)}")
    if value is None or isinstance(value, (bool, list, Path)):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{label} must be a finite number, got {quote(value)}")
    if r.choices is not None and value not in r.choices:
        raise InputError(f"{label} must be one of {', '.join(map(str, r.choices))}, got {quote(value)}")
    broken = [f"{word} {_number(bound)}" for word, bound, ok in (
        ("at least", r.min, lambda: value >= r.min), ("above", r.above, lambda: value > r.above),
        ("at most", r.max, lambda: value <= r.max), ("below", r.below, lambda: value < r.below))
        if bound is not None and isinstance(value, (int, float)) and not ok()]
    if broken:
        raise InputError(f"{label} must be {' and '.join(broken)}, got {quote(given)}")
    reason = r.check(value) if r.check else None
    if reason:
        raise InputError(f"{label} {reason}")
    return value


def validate(settings, label: Callable[[str], str] = str):
    """`settings` with each field checked (and converted: a str to a Path) against its type and Rule,
    then each class's own `check()` of fields together; `label(name)` names a field in messages."""
    hints = type_hints(type(settings))
    values = {f.name: check_value(label(f.name), getattr(settings, f.name), hints[f.name],
                                  dataclasses.replace(rule(f), check=None))
              for f in fields(type(settings))}
    for f in fields(type(settings)):   # the further checks last: some are slow (the backbone's loads torch)
        reason = rule(f).check(values[f.name]) if rule(f).check and values[f.name] is not None else None
        if reason:
            raise InputError(f"{label(f.name)} {reason}")
    settings = dataclasses.replace(settings, **values)
    for klass in reversed(type(settings).__mro__):
        if "check" in vars(klass):
            vars(klass)["check"](settings)
    return settings


def from_mapping(cls, raw, where: str):
    """Settings `cls` from a params.yaml section `where` (e.g. 'extract'); an unknown key is refused with
    the allowed ones."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"params.yaml: {where} must be a mapping of settings, got {quote(raw)}")
    allowed = [f.name for f in fields(cls)]
    for key in raw:
        if key not in allowed:
            raise InputError(f"params.yaml: {where}.{key_name(key)} is not a setting; allowed: {', '.join(allowed)}")
    return validate(cls(**raw), lambda name: f"params.yaml: {where}.{name}")


def key_name(key) -> str:
    """A key read from a file, as an error line may show it."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else quote(key)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_options(cls, values: dict):
    """Settings `cls` from command-line option values; messages name the options."""
    return validate(cls(**values), option_name)

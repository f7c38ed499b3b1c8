"""YAML configuration with command-line overrides.

Every command accepts ``--config file.yaml`` and any number of ``--set key.sub=value``; values
are parsed as YAML scalars (``--set lr=1e-5 --set tasks=[sst2,cola]``). Options given as proper
flags override both. Unknown keys are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distac.errors import ConfigError, DistacError

T = TypeVar("T")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, found {type(payload).__name__}")
    return payload


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. condition.steps=500)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    path = [part.strip() for part in key.split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r}: empty part in key {key!r}")
    return path, value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = _deepcopy(config)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings, got the single string {overrides!r}")
    for text in overrides:
        if not isinstance(text, str):
            raise ConfigError(f"override {text!r} must be a key=value string")
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    base = read_yaml(path) if path else {}
    return apply_overrides(base, overrides)


def build_dataclass(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Instantiate a config dataclass, rejecting unknown keys with the list of valid ones."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted((k for k in values if k not in fields), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; valid options: {sorted(fields)}")
    hints = _type_hints(cls)
    checked: dict[str, Any] = {}
    for name, value in values.items():
        expected = hints.get(name)
        if expected is not None:
            value = _coerce_number(value, expected)
            if not conforms(value, expected):
                raise ConfigError(f"{where}: option {name!r} must be {describe_type(expected)}, got {value!r}")
        checked[name] = value
    try:
        return cls(**checked)
    except DistacError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def outside_interval(
    value: float, low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True
) -> str | None:
    """The interval as text (``[0, 1)``) when ``value`` lies outside it, else None. Shared by config
    options and merge hyperparameters so both report ranges the same way."""
    too_low = low is not None and (value < low or (not low_inclusive and value == low))
    too_high = high is not None and (value > high or (not high_inclusive and value == high))
    if not (too_low or too_high):
        return None
    return interval_text(low, high, low_inclusive, high_inclusive)


def interval_text(
    low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True
) -> str:
    """An interval as error messages write it: ``[0, 1)``, ``(0.0, 1.0]``, ``[1, inf]``."""
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def check_option(
    owner: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Validate one numeric option of a config dataclass; the error names ``owner.name`` and the range."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{owner}.{name} must be {kind}, got {value!r}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(float(value)):
        raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise ConfigError(f"{owner}.{name} must be an integer, got {value!r}")
    interval = outside_interval(value, low, high, low_inclusive, high_inclusive)
    if interval:
        raise ConfigError(f"{owner}.{name} must be in {interval}, got {value!r}")


def check_type_option(owner: str, name: str, value: object, expected: type | tuple[type, ...]) -> None:
    """``value`` must be an instance of ``expected`` (bool is never accepted for int)."""
    types_ = expected if isinstance(expected, tuple) else (expected,)
    if (isinstance(value, bool) and bool not in types_) or not isinstance(value, types_):
        names = " or ".join(describe_type(t) for t in types_)
        raise ConfigError(f"{owner}.{name} must be {names}, got {value!r}")


def check_device_option(owner: str, name: str, value: object) -> None:
    """``auto`` or a device torch can parse (``cpu``, ``cuda``, ``cuda:1``); availability is checked at run time."""
    check_type_option(owner, name, value, str)
    if value in ("", "auto"):
        return
    import torch

    try:
        torch.device(value)  # type: ignore[arg-type]
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"{owner}.{name}: {value!r} is not a device (auto, cpu, cuda, cuda:1, ...): {exc}") from exc


def check_choice_option(owner: str, name: str, value: object, choices: Iterable[str]) -> None:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {choices}, got {value!r}")


# ------------------------------------------------------------------------------------ type checks
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: skip the type check, keep the rest
        return {}


def _admits(tp: Any, target: type) -> bool:
    if tp is target:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_admits(a, target) for a in typing.get_args(tp))
    return False


def _coerce_number(value: Any, tp: Any) -> Any:
    """YAML reads ``1e-5`` (no dot) as a string; accept it where the option is a float."""
    if isinstance(value, str) and _admits(tp, float) and not _admits(tp, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def conforms(value: Any, tp: Any) -> bool:
    """Whether a config value fits a type annotation (ints count as floats, mappings as dataclasses)."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Path:
        return isinstance(value, str | Path)
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
        element = args[0] if args else Any
        return all(conforms(v, element) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return all(conforms(k, key_type) and conforms(v, value_type) for k, v in value.items())
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp | Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe_type(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return {"float": "a number", "int": "an integer", "str": "a string", "bool": "true/false"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value

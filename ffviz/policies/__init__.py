"""Cache policies by name. ``make_policy("window")`` or with parameters."""
from __future__ import annotations

import dataclasses
import math

from ffviz.policies.base import Policy, PolicyContext, PolicyError
from ffviz.policies.deep_forcing import DeepForcing
from ffviz.policies.expected_attention import ExpectedAttention
from ffviz.policies.forcing_kv import ForcingKV
from ffviz.policies.full import Full
from ffviz.policies.future_forcing import FutureForcing
from ffviz.policies.h2o import H2O
from ffviz.policies.oracle import Oracle
from ffviz.policies.sink import Sink
from ffviz.policies.snapkv import SnapKV
from ffviz.policies.window import Window

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (
    Full, Window, Sink, H2O, SnapKV, DeepForcing, ExpectedAttention, FutureForcing, ForcingKV,
    Oracle)}


def _fields(cls) -> dict:
    """A policy's parameters: its init fields (internal state is not a parameter)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def make_policy(name: str, **params) -> Policy:
    """Build a policy by name; unknown names and parameters are clear errors."""
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = _fields(cls)
    for key in params:
        if key not in fields:
            raise PolicyError(f"policy {name!r} has no parameter {key!r}"
                              + (f"; its parameters: {', '.join(fields)}" if fields else
                                 "; it takes none"))
    return cls(**params)


def parse_policy_args(name: str, pairs: list[str]) -> dict:
    """``["horizon=4", "rank=2"]`` -> typed kwargs for policy ``name``."""
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    fields = _fields(POLICIES[name])
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PolicyError(f"policy argument {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        if key not in fields:
            raise PolicyError(f"policy {name!r} has no parameter {key!r}; its parameters: "
                              f"{', '.join(fields) or 'none'}")
        out[key] = parse_policy_value(name, key, raw, fields[key].default)
    return out


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_policy_value(name: str, key: str, value, default):
    """One parameter value, typed as its ``default``: from text (the command line, a
    text box) or a loosely typed widget value (a float from a number box). Whole
    numbers for an int, finite numbers for a float, true/false (1/0, yes/no, on/off)
    for a bool; text stays text. The range is the policy's own check."""
    text = value.strip().lower() if isinstance(value, str) else None
    try:
        if isinstance(default, bool):
            if isinstance(value, bool) or text in TRUE + FALSE:
                return value if isinstance(value, bool) else text in TRUE
            raise ValueError
        if isinstance(default, (int, float)):
            if isinstance(value, bool):
                raise ValueError
            exact = text is not None and text.lstrip("+-").isdigit()  # no float rounding
            number = int(text) if exact else float(value)
            if not math.isfinite(number) or (isinstance(default, int) and number != int(number)):
                raise ValueError
            return type(default)(number)
        return value
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}[type(default)]
        raise PolicyError(f"{name}.{key} must be {kind}, got {value!r}") from None


__all__ = ["POLICIES", "Policy", "PolicyContext", "PolicyError", "make_policy", "parse_policy_args",
           "parse_policy_value"]

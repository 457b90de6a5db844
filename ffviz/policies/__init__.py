"""Cache policies by name. ``make_policy("window")`` or with parameters."""
from __future__ import annotations

import dataclasses

from ffviz.policies.base import Policy, PolicyContext, PolicyError
from ffviz.policies.deep_forcing import DeepForcing
from ffviz.policies.expected_attention import ExpectedAttention
from ffviz.policies.full import Full
from ffviz.policies.future_forcing import FutureForcing
from ffviz.policies.h2o import H2O
from ffviz.policies.oracle import Oracle
from ffviz.policies.sink import Sink
from ffviz.policies.snapkv import SnapKV
from ffviz.policies.window import Window

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (
    Full, Window, Sink, H2O, SnapKV, DeepForcing, ExpectedAttention, FutureForcing, Oracle)}


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
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                out[key] = int(raw)
            elif isinstance(default, float):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise PolicyError(f"policy argument {key}={raw!r}: expected {type(default).__name__}") from None
    return out


__all__ = ["POLICIES", "Policy", "PolicyContext", "PolicyError", "make_policy", "parse_policy_args"]

"""Cache policies by name. ``make_policy("window")`` or with parameters."""
from __future__ import annotations

import dataclasses

from ffviz.policies.base import Policy, PolicyContext, PolicyError
from ffviz.policies.full import Full
from ffviz.policies.window import Window

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Full, Window)}


def make_policy(name: str, **params) -> Policy:
    """Build a policy by name; unknown names and parameters are clear errors."""
    if name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
    fields = {f.name: f for f in dataclasses.fields(POLICIES[name])}
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

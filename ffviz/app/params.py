"""Policy parameters as widgets see them, read from the POLICIES registry.

Every policy's parameters are its dataclass fields with defaults, so the app
builds one widget per field at start-up and new policies appear without app
changes. Values come back from widgets loosely typed (a float from a number
box, a string from a text box); ``collect`` coerces them to the field's type
and lets the policy's own validation name the bad range.
"""
from __future__ import annotations

import dataclasses
import math

from ffviz.policies import POLICIES, PolicyError, make_policy


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    policy: str
    name: str
    kind: str  # "bool" | "int" | "float" | "str"
    default: object
    doc: str = ""


def _kind(default) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "str"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ""


def param_specs(policies: dict | None = None) -> list[ParamSpec]:
    """Every (policy, parameter) in registry order; the app makes one widget each."""
    out = []
    for name, cls in (policies or POLICIES).items():
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            d = _default(f)
            out.append(ParamSpec(name, f.name, _kind(d), d, str(f.metadata.get("doc", ""))))
    return out


def _coerce(spec: ParamSpec, value):
    label = f"{spec.policy}.{spec.name}"
    if value is None or (isinstance(value, str) and not value.strip()):
        return spec.default
    try:
        if spec.kind == "bool":
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if spec.kind == "int":
            v = float(value)
            if not math.isfinite(v) or v != int(v):
                raise ValueError
            return int(v)
        if spec.kind == "float":
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if spec.default is None and isinstance(value, str):
            return _literal(value)
        return value
    except (TypeError, ValueError):
        raise PolicyError(f"{label} must be {'an integer' if spec.kind == 'int' else 'a number'}, "
                          f"got {value!r}") from None


def _literal(text: str):
    """A parameter whose default is None: read numbers and none/true/false from text."""
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def collect(policy: str, specs: list[ParamSpec], values: list) -> dict:
    """The chosen policy's parameters from the flat list of all widget values."""
    if policy not in POLICIES:
        raise PolicyError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    return {s.name: _coerce(s, v) for s, v in zip(specs, values) if s.policy == policy}


def build_policy(policy: str, specs: list[ParamSpec], values: list):
    """A validated policy object (``PolicyError`` names the bad parameter)."""
    params = collect(policy, specs, values)
    try:
        return make_policy(policy, **params)
    except PolicyError:
        raise
    except (TypeError, ValueError) as e:  # a policy's own validation
        raise PolicyError(f"policy {policy}: {e}") from None

"""Policy parameters as widgets see them, read from the POLICIES registry.

Every policy's parameters are its dataclass fields with defaults, so the app
builds one widget per field at start-up and new policies appear without app
changes. Values come back from widgets loosely typed (a float from a number
box, a string from a text box); ``collect`` coerces them to the field's type
and lets the policy's own validation name the bad range.
"""
from __future__ import annotations

import dataclasses

from ffviz.policies import POLICIES, PolicyError, make_policy, parse_policy_value


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
    """A widget's value typed as its field (the policies' parser); blank = the default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return spec.default
    return parse_policy_value(spec.policy, spec.name, value, spec.default)


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

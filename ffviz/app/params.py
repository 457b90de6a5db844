"""Policy parameters as widgets see them, read from the POLICIES registry.

Every policy's parameters are its dataclass fields with defaults, so the app
builds one widget per field at start-up and new policies appear without app
changes. Values come back from widgets loosely typed (a float from a number
box, a string from a text box); ``collect`` coerces them to the field's type
and lets the policy's own validation name the bad range.
"""
from __future__ import annotations

import dataclasses
import re

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


def _split_top(text: str, sep: str = ";") -> list[str]:
    """``text`` split at ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def docstring_params(cls) -> dict[str, str]:
    """Parameter descriptions from the policies' class docstrings, which list them as
    "name: what it does; other, names: ..." (the class's own first, then its bases')."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        text = " ".join((klass.__dict__.get("__doc__") or "").split())
        for part in _split_top(text):
            m = re.match(r"\s*([a-z_]+(?:\s*,\s*[a-z_]+)*)\s*:\s*(.+)", part)
            if not m:
                continue
            for name in re.split(r"\s*,\s*", m.group(1)):
                out.setdefault(name, m.group(2).strip().rstrip(".").replace("``", ""))
    return out


def param_specs(policies: dict | None = None) -> list[ParamSpec]:
    """Every (policy, parameter) in registry order; the app makes one widget each.
    ``doc``: the field's ``doc`` metadata, else its class docstring's description."""
    out = []
    for name, cls in (policies or POLICIES).items():
        docs = docstring_params(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            d = _default(f)
            doc = str(f.metadata.get("doc", "")) or docs.get(f.name, "")
            out.append(ParamSpec(name, f.name, _kind(d), d, doc))
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

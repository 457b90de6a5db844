"""A bad-input campaign: generated bad inputs through the CLI (in process) and through
the app's ``/generate`` endpoint. Each must end in a clear message (CLI: ``error: ...``
and exit code 2; app: an error, not a crash), leave no half-written output behind,
and the app must go on serving."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ffviz.__main__ import main
from ffviz.generate import MAX_FRAMES
from ffviz.policies import POLICIES

BAD_VALUES = {int: ["abc", "nan", "inf", "1.5", ""], float: ["abc", "nan", "inf", "-inf", ""],
              bool: ["maybe", "nan", "2", ""], str: ["", "nan", "no-such-choice"]}


def _policy_cases():
    for name, cls in POLICIES.items():
        for f in dataclasses.fields(cls):
            if f.init:
                for raw in BAD_VALUES[type(f.default)]:
                    yield name, f"{f.name}={raw}"
        yield name, "no_such_parameter=1"
        yield name, "missing-equals-sign"


POLICY_CASES = list(_policy_cases())

GENERATE_CASES = [
    *[["--policy", name, "--policy-arg", arg] for name, arg in POLICY_CASES],
    ["--policy", "no_such_policy"],
    *[["--budget", b] for b in ("0", "-1", "x", "1.5", "99")],  # 99 > the 4-frame run
    *[["--frames", f] for f in ("0", "-3", str(MAX_FRAMES + 1), "ten", "1e3")],
    *[["--seed", s] for s in ("-1", str(2 ** 40), "x")],
    *[["--steps", s] for s in ("0", "51", "x")],
    *[["--context-noise", c] for c in ("1.5", "-0.1", "nan", "inf")],
    ["--threads", "0"],
    *[["--prompt", p] for p in ("", "   ", "a red circle " * 10_000, "\x00\x01\x02",
                                "一个红色的圆", "🔴🟦", "a red circle on a red background",
                                "a red circle, a blue square, a cyan circle and a white square",
                                "circle" * 500)],
]


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


def _check(code, err, out_dir):
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err, err
    assert not out_dir.exists() or not any(out_dir.iterdir()), "half-written output left behind"


@pytest.mark.parametrize("extra", GENERATE_CASES,
                         ids=[" ".join(c)[:60].encode("unicode_escape").decode() for c in GENERATE_CASES])
def test_cli_generate_refuses_bad_input(extra, tmp_path, capsys, tiny_weights):
    out = tmp_path / "out"
    args = {"--frames": "4", "--budget": "2", "--prompt": "a red circle on a black background"}
    argv = ["generate", "--out", str(out), "--weights", str(tiny_weights), "--no-record"]
    given = set(extra[::2])
    for k, v in args.items():
        if k not in given:
            argv += [k, v]
    code, err = _run(argv + extra, capsys)
    _check(code, err, out)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A small random model's weights with their card (loading is what is tested)."""
    from ffviz.weights import save_weights
    from tests.conftest import random_model
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(random_model(width=32, layers=1), path, {"steps": 0})
    return path


def _corrupt(kind, good, tmp_path):
    """A weights file (and card) broken one way."""
    import shutil
    bad = tmp_path / "bad.safetensors"
    shutil.copy(good, bad)
    shutil.copy(good.with_suffix(".json"), bad.with_suffix(".json"))
    data = bad.read_bytes()
    card = json.loads(bad.with_suffix(".json").read_text(encoding="utf-8"))
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "flipped bytes":
        bad.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif kind == "truncated, card updated":
        bad.write_bytes(data[: len(data) // 2])
        from ffviz.weights import sha256
        card["sha256"] = sha256(bad)
    elif kind == "wrong shapes":
        card["config"]["width"] = 64
    elif kind == "wrong hash":
        card["sha256"] = "0" * 64
    elif kind == "card missing":
        bad.with_suffix(".json").unlink()
        return bad
    elif kind == "card not json":
        bad.with_suffix(".json").write_text("{not json", encoding="utf-8")
        return bad
    elif kind == "not safetensors":
        bad.write_bytes(b"hello" * 1000)
        from ffviz.weights import sha256
        card["sha256"] = sha256(bad)
    elif kind == "file missing":
        bad.unlink()
    bad.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return bad


WEIGHT_CASES = ["truncated", "flipped bytes", "truncated, card updated", "wrong shapes",
                "wrong hash", "card missing", "card not json", "not safetensors", "file missing"]


@pytest.mark.parametrize("kind", WEIGHT_CASES)
@pytest.mark.parametrize("command", ["generate", "showcase", "eval", "bench"])
def test_cli_refuses_broken_weights(kind, command, tmp_path, capsys, tiny_weights):
    bad = _corrupt(kind, tiny_weights, tmp_path)
    out = tmp_path / "out"
    argv = {"generate": ["generate", "--frames", "4", "--budget", "2"],
            "showcase": ["showcase", "--frames", "4", "--seeds", "0"],
            "eval": ["eval", "--frames", "4", "--seeds", "0", "--budgets", "2", "--policies", "window"],
            "bench": ["bench", "--frames", "4", "--repeats", "1"]}[command]
    argv += ["--weights", str(bad)] + (["--out", str(out)] if command != "bench" else [])
    code, err = _run(argv, capsys)
    _check(code, err, out)
    assert "weights" in err


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only filesystem"])
@pytest.mark.parametrize("command", ["generate", "showcase", "eval", "bench"])
def test_cli_refuses_unwritable_outputs_before_any_work(where, command, tmp_path, capsys,
                                                        tiny_weights):
    import os
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    out = {"a file": a_file, "under a file": a_file / "out",
           "read-only filesystem": "/proc/ffviz-out"}[where]
    if where == "read-only filesystem" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    argv = {"generate": ["generate", "--frames", "4", "--budget", "2", "--out", str(out)],
            "showcase": ["showcase", "--frames", "4", "--seeds", "0", "--out", str(out)],
            "eval": ["eval", "--frames", "4", "--seeds", "0", "--budgets", "2", "--policies",
                     "window", "--out", str(out)],
            "bench": ["bench", "--frames", "4", "--repeats", "1", "--out", f"{out}/b.json"]}[command]
    code, err = _run(argv + ["--weights", str(tiny_weights)], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err, err
    assert str(out) in err
    assert a_file.read_text(encoding="utf-8") == "x"


API_CASES = [
    # (prompt, policy, budget, frames, seed)
    ("", "window", 2, 4, 0), ("   ", "window", 2, 4, 0), ("a red circle " * 10_000, "window", 2, 4, 0),
    ("\x00\x07\x1b[31m", "window", 2, 4, 0), ("一个红色的圆", "window", 2, 4, 0),
    ("a red circle on a red background", "window", 2, 4, 0),
    ("a red circle", "no_such_policy", 2, 4, 0), ("a red circle", "oracle", 2, 4, 0),
    ("a red circle", "window", 0, 4, 0), ("a red circle", "window", -1, 4, 0),
    ("a red circle", "window", 9, 4, 0), ("a red circle", "window", math.nan, 4, 0),
    ("a red circle", "window", 2, 0, 0), ("a red circle", "window", 2, -5, 0),
    ("a red circle", "window", 2, 10_000, 0), ("a red circle", "window", 2, math.inf, 0),
    ("a red circle", "window", 2, 4, -1), ("a red circle", "window", 2, 4, math.nan),
    ("a red circle", "window", 2.5, 4, 0),
]


def test_api_generate_refuses_bad_input_and_keeps_serving(server):
    from gradio_client import Client
    c = Client(server, verbose=False)
    for args in API_CASES:
        try:
            c.predict(*args, api_name="/generate")
        except Exception as e:
            assert "Traceback" not in str(e), (args, str(e))
        else:
            raise AssertionError(f"/generate accepted {args!r}")
    video, summary = c.predict("a red circle on a black background", "window", 2, 4, 0,
                               api_name="/generate")
    assert summary["frames"] == 4
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert len(GENERATE_CASES) + len(API_CASES) + 4 * len(WEIGHT_CASES) >= 100

"""The evaluation harness: a policy x budget grid on a random model, 8 frames."""
import csv
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffviz.evaluate import (MAX_EVAL_FRAMES, RESULT_COLUMNS, EvalConfig, EvalError, aggregate,
                            evaluate, parse_policy_arg_list, parse_prompts, psnr)
from ffviz.generate import Controls, RunSettings, generate
from ffviz.policies import POLICIES, PolicyError
from ffviz.reference import ReferenceQueries
from ffviz.scenes import PromptError
from ffviz.sweep import run_sweep
from ffviz.train import TRAIN_SEED_BASE
from tests.conftest import random_model

PROMPT = "a red circle and a blue square on a green background with a gray pillar"
FRAMES = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for threads; on a busy machine two
    threads are many times slower than one (as `eval --threads 1` does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def grid(model, tmp_path_factory):
    """Every registered policy, two budgets, two seeds, one prompt."""
    out = tmp_path_factory.mktemp("eval")
    config = EvalConfig(policies=list(POLICIES), budgets=[2, 4], seeds=[0, 3], frames=FRAMES,
                        prompts=[PROMPT], horizon=3)
    summary = run_sweep(model, config, out, show_progress=False)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return out, config, summary, {(r["policy"], int(r["budget"]), int(r["seed"])): r for r in rows}, rows


def test_one_row_per_policy_budget_seed_with_every_column(grid):
    out, config, summary, by_key, rows = grid
    assert len(rows) == len(config.policies) * 2 * 2 == len(by_key)
    assert set(by_key) == {(p, b, s) for p in config.policies for b in (2, 4) for s in (0, 3)}
    assert list(rows[0]) == RESULT_COLUMNS
    for key, r in by_key.items():
        assert r["errors"] == "", key
        for col in ("consistency", "attn_rel_err", "rollout_psnr_vs_full", "step_ms",
                    "peak_cache_tokens"):
            assert r[col] != "", (key, col)
            assert not math.isnan(float(r[col])), (key, col)
    assert summary["failed_runs"] == 0
    assert (out / "runs.csv").read_text().count("\n") == 1 + len(rows)  # one prompt


def test_full_is_exact_and_window_is_not(grid, model):
    _, _, _, by_key, _ = grid
    n = model.cfg.tokens_per_frame
    for b in (2, 4):
        for s in (0, 3):
            full, window = by_key[("full", b, s)], by_key[("window", b, s)]
            assert float(full["attn_rel_err"]) == 0.0
            assert float(full["rollout_psnr_vs_full"]) == math.inf
            assert full["proxy_spearman"] == "" and window["proxy_spearman"] == ""
            assert int(full["peak_cache_tokens"]) == FRAMES * n
            assert float(window["attn_rel_err"]) > 0  # budget < frames: it forgot
            assert math.isfinite(float(window["rollout_psnr_vs_full"]))
            assert int(window["peak_cache_tokens"]) == (b + 1) * n
            assert float(window["policy_ms_per_compression"]) > 0
            assert float(window["step_ms"]) > 0
    # a bigger window forgets less
    for s in (0, 3):
        assert float(by_key[("window", 4, s)]["attn_rel_err"]) < float(by_key[("window", 2, s)]["attn_rel_err"])


def test_oracle_scores_agree_with_the_truth_and_proxies_are_filled(grid):
    _, _, _, by_key, _ = grid
    for b in (2, 4):
        for s in (0, 3):
            oracle = by_key[("oracle", b, s)]
            assert float(oracle["proxy_spearman"]) == pytest.approx(1.0, abs=1e-9)
            assert float(oracle["proxy_topb_recall"]) == pytest.approx(1.0, abs=1e-9)
            for name in ("future_forcing", "expected_attention", "snapkv"):
                r = by_key[(name, b, s)]
                assert -1 <= float(r["proxy_spearman"]) <= 1
                assert 0 <= float(r["proxy_topb_recall"]) <= 1


def test_markdown_and_plots_exist(grid):
    out, config, summary, _, _ = grid
    md = (out / "results.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 2 + len(config.policies) * 2  # header, rule, policy x budget
    assert "| full | 2 |" in md and "inf" in md
    for name in summary["files"]:
        assert (out / name).stat().st_size > 0, name
    pngs = sorted(p.name for p in out.glob("plot_*.png"))
    assert "plot_attn_rel_err.png" in pngs and "plot_proxy_spearman.png" in pngs
    for p in out.glob("plot_*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_queries_are_the_full_runs_post_rope_queries(model):
    """The recorded queries match a second recording of the same run, and the
    future window is clipped at the run's end (None after the last frame)."""
    ref = ReferenceQueries(model, FRAMES, model.cfg.sample_steps, horizon=3).attach()
    seen = {}

    def grab(q, hook):
        if hook.ctx.phase == "denoise" and hook.ctx.step == 1:
            seen[int(hook.ctx.token_frame[0])] = q[0].clone()
    from ffviz.hooks import Hooks
    hooks = Hooks(model)
    hooks.add("blocks.1.attn.hook_q_post", grab)
    try:
        list(generate(model, RunSettings(PROMPT, frames=FRAMES, record=False), Controls("full", FRAMES)))
    finally:
        ref.detach()
        hooks.remove()
    g = model.cfg.given_frames
    assert bool(ref.filled[g:].all()) and not bool(ref.filled[:g].any())
    torch.testing.assert_close(ref.q[5, 1, 1].float(), seen[5].half().float())
    H, n, d = model.cfg.heads, model.cfg.tokens_per_frame, model.cfg.head_dim
    S = model.cfg.sample_steps
    assert ref.future(1, 0).shape == (1, H, 3 * S * n, d)
    assert ref.future(FRAMES - 3, 0).shape == (1, H, 2 * S * n, d)  # clipped
    assert ref.future(FRAMES - 1, 0) is None
    # frame 2's queries come first, step by step
    torch.testing.assert_close(ref.future(1, 1)[0, :, n], ref.q[2, 1, 1, :, 0].float())  # frame 2, step 1, token 0


def test_last_step_queries_only(model):
    config = EvalConfig(policies=["oracle"], budgets=[2], seeds=[0], frames=6, prompts=[PROMPT],
                        query_steps="last")
    rows = evaluate(model, config)
    assert len(rows) == 1 and float(rows[0]["proxy_spearman"]) == pytest.approx(1.0)


def test_a_policy_that_cannot_run_is_an_error_row_not_a_crash(model):
    config = EvalConfig(policies=["window", "oracle"], budgets=[1], seeds=[0], frames=6,
                        prompts=[PROMPT], policy_args={"oracle": ["n_sink=1", "n_recent=1"]})
    rows = evaluate(model, config)
    by = {r["policy"]: r for r in rows}
    assert by["window"]["error"] == "" and "do not fit" in by["oracle"]["error"]
    agg = {r["policy"]: r for r in aggregate(rows)}
    assert agg["oracle"]["prompts"] == 0 and agg["oracle"]["errors"]


@pytest.mark.parametrize("kw,err,msg", [
    ({"policies": ["lru"]}, PolicyError, "unknown policy"),
    ({"budgets": [0]}, EvalError, "budget must be in"),
    ({"budgets": [9]}, EvalError, "budget must be in"),
    ({"frames": MAX_EVAL_FRAMES + 1}, EvalError, "at most|frames must be in"),
    ({"frames": 2}, EvalError, "frames must be in"),
    ({"seeds": [TRAIN_SEED_BASE]}, EvalError, "user seeds"),
    ({"seeds": [-1]}, EvalError, "user seeds"),
    ({"seeds": [0, 0]}, EvalError, "duplicates"),
    ({"budgets": []}, EvalError, "at least one"),
    ({"horizon": 0}, EvalError, "horizon"),
    ({"query_steps": "first"}, EvalError, "query_steps"),
    ({"prompts": ["nothing at all"]}, PromptError, "no object"),
    ({"policy_args": {"window": ["size=3"]}}, PolicyError, "has no parameter"),
    ({"policy_args": {"oracle": ["n_sink=1"]}, "policies": ["window"]}, EvalError, "not among"),
])
def test_bad_settings_are_clear_errors(model, kw, err, msg):
    config = EvalConfig(**{"policies": ["window"], "budgets": [2], "seeds": [0], "frames": 8,
                           "prompts": [PROMPT], **kw})
    with pytest.raises(err, match=msg):
        evaluate(model, config)


def test_small_parsers(tmp_path):
    f = tmp_path / "suite.txt"
    f.write_text("# a comment\na red circle\n\na blue square\n")
    assert parse_prompts(str(f)) == ["a red circle", "a blue square"]
    assert parse_prompts("a red circle; a blue square") == ["a red circle", "a blue square"]
    assert parse_policy_arg_list(["oracle:n_sink=1", "oracle:n_recent=2"]) == \
        {"oracle": ["n_sink=1", "n_recent=2"]}
    with pytest.raises(EvalError, match="policy:key=value"):
        parse_policy_arg_list(["n_sink=1"])
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 255) == pytest.approx(0.0)


def ffviz(*args):
    return subprocess.run([sys.executable, "-m", "ffviz", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["--policies", "full,lru"], "unknown policy"),
    (["--budgets", "0"], "budget must be in"),
    (["--budgets", "two"], "comma-separated list"),
    (["--frames", "300"], "frames must be in [4, 256]"),
    (["--seeds", str(TRAIN_SEED_BASE)], "user seeds"),
    (["--policy-arg", "n_sink=1"], "policy:key=value"),
])
def test_cli_bad_input_exits_2_before_loading(tmp_path, capsys, args, msg):
    from ffviz.__main__ import main
    code = main(["eval", "--out", str(tmp_path / "x"), "--weights", "/nonexistent.safetensors", *args])
    assert code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_writes_results(tmp_path):
    out = tmp_path / "ev"
    r = ffviz("eval", "--policies", "full,window", "--budgets", "2", "--seeds", "0",
              "--frames", "5", "--prompts", "a red circle on a green background", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2/2 [" in r.stderr  # the progress bar: runs done / total [elapsed<left]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(x["policy"], x["budget"], x["seed"]) for x in rows] == [("full", "2", "0"), ("window", "2", "0")]
    assert (out / "plot_consistency.png").exists() and (out / "results.md").exists()

"""The evaluation harness: a policy x budget grid on a random model, 8 frames."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffviz.eval_report import aggregate
from ffviz.evaluate import (MAX_EVAL_FRAMES, RESULT_COLUMNS, EvalConfig, EvalError, evaluate,
                            parse_policy_arg_list, parse_prompts, psnr)
from ffviz.generate import Controls, RunSettings, generate
from ffviz.policies import POLICIES, PolicyError
from ffviz.policies.scored import ScoredPolicy
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
    with open(out / "results.csv", encoding="utf-8") as f:
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
    assert (out / "runs.csv").read_text(encoding="utf-8").count("\n") == 1 + len(rows)  # one prompt


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
    md = (out / "results.md").read_text(encoding="utf-8")
    sections = md.split("\n## ")
    for title in ("Quality", "Own-cache fidelity and cost"):
        section = next(s for s in sections if s.startswith(title))
        table = [l for l in section.splitlines() if l.startswith("| ")]
        assert len(table) == 2 + len(config.policies) * 2  # header, rule, policy x budget
        assert "score-chosen tokens" in table[0]  # every table says what the score chose
    assert "| full | 2 |" in md and "inf" in md and " ± " in md
    assert "## Shared-cache fidelity: every scorer rates window's caches" in md
    assert "## Paired comparisons" in md
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
    ({"fidelity_reference": "sink"}, EvalError, "fidelity reference"),
    ({"fidelity_reference": "full", "policies": ["full", "window"]}, EvalError, "hold a budget"),
])
def test_bad_settings_are_clear_errors(model, kw, err, msg):
    config = EvalConfig(**{"policies": ["window"], "budgets": [2], "seeds": [0], "frames": 8,
                           "prompts": [PROMPT], **kw})
    with pytest.raises(err, match=msg):
        evaluate(model, config)


def test_small_parsers(tmp_path):
    f = tmp_path / "suite.txt"
    f.write_text("# a comment\na red circle\n\na blue square\n", encoding="utf-8")
    assert parse_prompts(str(f)) == ["a red circle", "a blue square"]
    assert parse_prompts("a red circle; a blue square") == ["a red circle", "a blue square"]
    long = ";".join(["a small red circle on a blue background with a wide gray pillar"] * 5)
    assert len(parse_prompts(long)) == 5  # longer than a file name may be: not a path
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
    (["--variant", "window=sink"], "is a policy's name"),
    (["--variant", "x=lru"], "unknown policy 'lru'"),
    (["--variant", "x"], "label=policy"),
    (["--variant", "x=sink", "--policy-arg", "x:n_sink=-1"], "n_sink"),
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
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(x["policy"], x["budget"], x["seed"]) for x in rows] == [("full", "2", "0"), ("window", "2", "0")]
    assert (out / "plot_consistency.png").exists() and (out / "results.md").exists()


def test_cli_variants_evaluate_a_policy_under_other_settings(tmp_path):
    """--variant LABEL=POLICY puts POLICY in the grid again under LABEL, with its own
    --policy-arg LABEL:... (head budgets here): its row and its stored run say which."""
    out = tmp_path / "ev"
    r = ffviz("eval", "--policies", "future_forcing", "--variant", "ff_adaptive=future_forcing",
              "--policy-arg", "ff_adaptive:head_budget=adaptive", "--budgets", "3", "--seeds", "0",
              "--frames", "6", "--prompts", "a red circle on a green background",
              "--fidelity-reference", "none", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [x["policy"] for x in rows] == ["future_forcing", "ff_adaptive"]
    (unit,) = (out / "runs").glob("*.json")
    keys = json.loads(unit.read_text(encoding="utf-8"))["rows"]
    assert any(k.startswith("ff_adaptive|3|") and '"head_budget": "adaptive"' in k for k in keys)
    assert any(k.startswith("future_forcing|3|") and '"head_budget": "uniform"' in k for k in keys)


def test_score_chosen_tokens_are_the_kept_beyond_the_protected_frames(grid, model):
    """n_sink = n_recent = 1 fill a budget of 2 frames: the score chooses nothing there."""
    _, _, _, by_key, _ = grid
    n = model.cfg.tokens_per_frame
    for s in (0, 3):
        for name in ("future_forcing", "expected_attention"):
            assert float(by_key[(name, 2, s)]["score_chosen_tokens"]) == 0
            assert float(by_key[(name, 4, s)]["score_chosen_tokens"]) == 2 * n
        assert float(by_key[("sink", 2, s)]["score_chosen_tokens"]) == n  # its recency chose them
        assert float(by_key[("h2o", 4, s)]["score_chosen_tokens"]) == 3 * n
        for name in ("full", "window"):
            assert by_key[(name, 4, s)]["score_chosen_tokens"] == ""
        # forcing_kv protects per head (sink, ring, newest frame; layer 0 the whole budget):
        # what its stripes choose is at most one frame's buffer per head
        assert 0 <= float(by_key[("forcing_kv", 4, s)]["score_chosen_tokens"]) <= n


def test_shared_cache_fidelity_rates_one_cache_for_every_scorer(grid):
    out, config, _, by_key, _ = grid
    with open(out / "fidelity.csv", encoding="utf-8") as f:
        fid = list(csv.DictReader(f))
    overall = {(r["scorer"], int(r["budget"])): r for r in fid if r["layer"] == "all"}
    # every scored policy but sink (it ranks by recency: left to "recency"), and the two plain ones
    scorers = {name for name, cls in POLICIES.items() if issubclass(cls, ScoredPolicy)} - {"sink"}
    assert {s for s, _ in overall} == scorers | {"mass", "recency"}
    for b in (2, 4):
        assert float(overall[("oracle", b)]["spearman"]) == pytest.approx(1.0, abs=1e-9)
        assert float(overall[("mass", b)]["spearman"]) == 0  # a window's cache: every mass is 1
        assert all(r["reference"] == "window" for r in fid)
        per_head = [r for r in fid if r["scorer"] == "future_forcing" and int(r["budget"]) == b
                    and r["layer"] != "all"]
        assert len(per_head) == 2 * 2  # layers x heads of the random model
        for s in (0, 3):
            r = by_key[("future_forcing", b, s)]
            assert -1 <= float(r["shared_spearman"]) <= 1 and 0 <= float(r["shared_topb_recall"]) <= 1
            assert by_key[("window", b, s)]["shared_spearman"] == ""


def test_a_scorer_on_its_own_cache_is_its_own_fidelity(model):
    """With future_forcing as the fidelity reference, its shadow sees exactly its own run:
    shared-cache fidelity equals its own-cache fidelity."""
    config = EvalConfig(policies=["future_forcing", "expected_attention"], budgets=[3], seeds=[0],
                        frames=7, prompts=[PROMPT], horizon=2, fidelity_reference="future_forcing")
    from ffviz.eval_report import with_shared_fidelity
    rows = {r["policy"]: r for r in with_shared_fidelity(evaluate(model, config))}
    ff = rows["future_forcing"]
    assert ff["shared_fidelity"]["compressions"] >= 3
    assert ff["shared_spearman"] == pytest.approx(ff["proxy_spearman"], abs=1e-9)
    assert ff["shared_topb_recall"] == pytest.approx(ff["proxy_topb_recall"], abs=1e-9)
    assert math.isfinite(rows["expected_attention"]["shared_spearman"])


def test_intervals_and_comparisons_files(grid):
    out, config, _, _, _ = grid
    with open(out / "intervals.csv", encoding="utf-8") as f:
        intervals = {(r["policy"], r["budget"], r["metric"]): r for r in csv.DictReader(f)}
    r = intervals[("window", "2", "attn_rel_err")]
    assert int(r["seeds"]) == 2 and float(r["ci95_low"]) <= float(r["mean"]) <= float(r["ci95_high"])
    with open(out / "comparisons.csv", encoding="utf-8") as f:
        pairs = list(csv.DictReader(f))
    n = len(config.policies)
    assert len(pairs) == 2 * n * (n - 1) // 2 * 6  # budgets x pairs x compared metrics
    full_vs_window = next(p for p in pairs if (p["policy_a"], p["policy_b"], p["metric"], p["budget"])
                          == ("full", "window", "attn_rel_err", "2"))
    assert float(full_vs_window["mean_difference"]) < 0 and full_vs_window["verdict"]


def test_recency_variant_fills_the_budget_with_protected_frames(model):
    """A variant keeps the newest frames by recency: n_recent = budget - n_sink at each
    budget, so its score chooses nothing; its label names its rows."""
    from ffviz.evaluate import Variant, grid_runs
    config = EvalConfig(policies=["window", "ff merge only"], budgets=[3, 4], seeds=[0], frames=6,
                        prompts=[PROMPT], horizon=2,
                        variants={"ff merge only": Variant("future_forcing", recency=True)})
    runs = grid_runs(config, config.validate())
    assert [json.loads(r["policy_params"])["n_recent"] for r in runs[2:]] == [2, 3]
    rows = evaluate(model, config)
    merged = [r for r in rows if r["policy"] == "ff merge only"]
    assert len(merged) == 2 and all(r["score_chosen_tokens"] == 0 and not r["error"] for r in merged)
    with pytest.raises(EvalError, match="sets n_recent itself"):
        EvalConfig(policies=["v"], variants={"v": Variant("future_forcing", ("n_recent=2",),
                                                          recency=True)}).validate()


def test_psnr_is_averaged_as_squared_error():
    """One identical run (PSNR inf) must not make a policy's mean PSNR infinite: the mean
    is the PSNR of the mean squared error; only all-identical runs give inf."""
    from ffviz.eval_report import aggregate, over_seeds
    base = {"policy": "window", "budget": 3, "policy_params": "{}", "error": "",
            "peak_cache_tokens": 1}
    rows = [{**base, "seed": 0, "prompt": "a", "rollout_psnr_vs_full": math.inf},
            {**base, "seed": 0, "prompt": "b", "rollout_psnr_vs_full": 20.0}]
    (agg,) = aggregate(rows)
    assert agg["rollout_psnr_vs_full"] == pytest.approx(20 + 10 * math.log10(2))
    (row,) = over_seeds([agg, {**agg, "seed": 1, "rollout_psnr_vs_full": math.inf}])
    assert math.isfinite(row["rollout_psnr_vs_full"])
    (same,) = over_seeds([{**agg, "rollout_psnr_vs_full": math.inf}])
    assert same["rollout_psnr_vs_full"] == math.inf

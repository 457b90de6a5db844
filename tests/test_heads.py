"""Head roles: the per-head measures, the heads command, and the forcing_kv policy."""
import json
import math
import numpy as np
import pytest
import torch

from ffviz.cache import DEAD, KVCache
from ffviz.generate import Controls, Observer, RunSettings, generate
from ffviz.head_measures import frame_attention, head_measures, informative
from ffviz.heads import HeadMeter, HeadsError, head_matrices, head_view, measure_heads, write_heads
from ffviz.policies import PolicyContext, PolicyError, make_policy
from ffviz.policies.head_budget import kept_per_head
from ffviz.policies.stripes import StripeBuffer, stripe_of_rows
from tests.conftest import random_model


# -- the measures ---------------------------------------------------------------------

def test_frame_attention_is_the_softmax_summed_per_frame():
    g = torch.Generator().manual_seed(0)
    H, n, N, d = 2, 3, 10, 8
    q, k = torch.randn(H, n, d, generator=g), torch.randn(H, N, d, generator=g)
    frame = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, DEAD, 3]).expand(H, N)
    lm = torch.rand(H, N, generator=g).log()
    fa = frame_attention(q, k, frame, lm)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + lm[:, None], -1)
    p[..., 8] = 0
    p = p / p.sum(-1, keepdim=True)  # the dead key gets nothing, the rest share it all
    want = torch.stack([p[..., frame[0] == f].sum((-1, -2)) for f in range(4)], -1)
    torch.testing.assert_close(fa.mass, want.double(), rtol=1e-5, atol=1e-6)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1) / math.log(9)
    torch.testing.assert_close(fa.entropy, entropy.double(), rtol=1e-5, atol=1e-6)


def test_head_measures_score_and_shares():
    # frames 0..5, the chunk is frame 5; sink 1, recent 2 (the chunk + frame 4)
    mass = torch.tensor([[1.0, 1.0, 0.0, 1.0, 2.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0, 10.0]],
                        dtype=torch.float64)
    from ffviz.head_measures import FrameAttention
    m = head_measures(FrameAttention(mass, torch.zeros(2, dtype=torch.float64), 10), 5, 1, 2)
    assert m["score"].tolist() == pytest.approx([7 / 9, 1.0])
    assert m["sink_share"][0] == pytest.approx(0.1) and m["chunk_share"][0] == pytest.approx(0.5)
    assert m["recent_share"][0] == pytest.approx(0.2) and m["older_share"][0] == pytest.approx(0.2)
    total = sum(m[k] for k in ("sink_share", "chunk_share", "recent_share", "older_share"))
    torch.testing.assert_close(total, torch.ones(2, dtype=torch.float64))
    assert informative(5, 1, 2) and not informative(2, 1, 2)


def test_head_meter_measures_a_live_run_per_step():
    model = random_model()
    meter = HeadMeter(model, sink=1)
    try:
        list(generate(model, RunSettings("a red ball", frames=6, seed=0, steps=2), Controls("full", 1),
                      observer=meter))
    finally:
        meter.remove()
    per_step = meter.per_step()
    assert per_step["score"].shape == (2, 2, 2)  # steps, layers, heads
    m = meter.matrices()
    assert m["score"].shape == (2, 2) and np.isfinite(m["score"]).all() and m["static"].dtype == bool
    assert ((m["score"] > 0) & (m["score"] <= 1)).all()
    np.testing.assert_allclose(m["sink_share"] + m["chunk_share"] + m["recent_share"] + m["older_share"], 1)
    assert not model.blocks[0].attn.hook_q_post.fns  # the hooks are gone


def test_measure_heads_and_its_files(tmp_path):
    model = random_model()
    result = measure_heads(model, ["a red ball", "a blue square"], [0, 1], frames=6, steps=2)
    assert result["layers"] == 2 and result["heads_per_layer"] == 2 and len(result["heads"]) == 4
    for row in result["heads"]:
        assert {"layer", "head", "score", "role", "score_std", "score_std_prompts", "score_std_seeds",
                "score_std_steps", "role_agreement", "entropy", "sink_share", "older_share"} <= set(row)
        assert row["role"] in ("static", "dynamic") and row["samples"] == 2 * 2 * 2
        assert row["role"] == ("static" if row["score"] >= 0.8 else "dynamic")
        assert row["score_min"] <= row["score"] <= row["score_max"]
    assert 0 <= result["summary"]["static_share"] <= 1
    paths = write_heads(result, tmp_path)
    assert json.loads(paths[0].read_text(encoding="utf-8"))["heads"] == result["heads"] and paths[1].stat().st_size > 0
    m = head_matrices(result)
    assert m["score"].shape == (2, 2) and m["static"].dtype == bool
    with pytest.raises(HeadsError, match="frames"):
        measure_heads(model, ["a red ball"], [0], frames=2)
    with pytest.raises(HeadsError, match="threshold"):
        measure_heads(model, ["a red ball"], [0], frames=6, threshold=1.5)


def test_heads_command_on_the_committed_weights(tmp_path, capsys):
    """The bar: ``python -m ffviz heads --out DIR`` writes heads.json with layer, head,
    score and role for every head (small settings to keep the test short)."""
    from ffviz.__main__ import main
    out = tmp_path / "heads"
    assert main(["heads", "--frames", "8", "--seeds", "0", "--prompts",
                 "a red circle on a blue background", "--out", str(out)]) == 0
    data = json.loads((out / "heads.json").read_text(encoding="utf-8"))
    assert len(data["heads"]) == data["layers"] * data["heads_per_layer"] == 20 and data["model"] == "tiny"
    assert all({"layer", "head", "score", "role"} <= set(h) for h in data["heads"])
    assert (out / "heads.png").stat().st_size > 0 and "heads static" in capsys.readouterr().out
    assert main(["heads", "--sink", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "sink" in capsys.readouterr().err


def test_heads_on_wan():
    from ffviz.models import load_model
    result = measure_heads(load_model("wan:tiny-random"), ["a tree in the wind"], [0], frames=9, steps=1)
    assert len(result["heads"]) == 4 and all(h["samples"] == 1 for h in result["heads"])
    assert all(0 <= h["score"] <= 1 for h in result["heads"])


# -- the stripe buffer ----------------------------------------------------------------

def test_stripes_split_rows_evenly_and_keep_the_most_changed():
    assert stripe_of_rows(8, 6).tolist() == [0, 0, 1, 1, 2, 3, 4, 5]
    assert stripe_of_rows(4, 6).tolist() == [0, 1, 2, 3]
    rows, cols = 4, 2
    cache = KVCache(1, rows * cols, (rows, cols))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, rows * cols, 8, generator=g)
    nxt = base.clone()
    nxt[:, :, 2 * cols:3 * cols] = torch.randn(1, 2, cols, 8, generator=g)  # row 2 changes
    pos = lambda f: (torch.full((rows * cols,), f), torch.arange(rows).repeat_interleave(cols),
                     torch.arange(cols).repeat(rows))
    cache[0].append(base, base, *pos(0))
    cache[0].append(nxt, nxt, *pos(1))
    buf = StripeBuffer(stripes=4, capacity=cols, grid=(rows, cols))
    buf.offer(cache[0], 0, 1, torch.tensor([True, True]))
    assert [(f, s) for _, f, s in buf.held] == [(0, 2)]  # one stripe fits: the changed one
    held = ~torch.isnan(buf.token_change(cache[0]))
    assert held[0, 0].tolist() == [False] * 4 + [True] * 2 + [False] * 2 + [False] * 8


# -- forcing_kv -----------------------------------------------------------------------

class KeptFrames(Observer):
    def __init__(self):
        self.after = []

    def after_compress(self, cache, decision, ctx):
        if decision is not None:
            self.after.append((ctx.frame, [[sorted(set(l.frame[0, h][l.live[0, h]].tolist()))
                                            for h in range(l.frame.shape[1])] for l in cache.layers],
                               kept_per_head(decision)))


def heads_file(tmp_path, scores) -> str:
    L, H = len(scores), len(scores[0])
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"model": "test", "layers": L, "heads_per_layer": H, "heads": [
        {"layer": l, "head": h, "score": scores[l][h], "role": "?"} for l in range(L) for h in range(H)]}),
        encoding="utf-8")
    return str(path)


def test_forcing_kv_static_and_dynamic_heads_keep_what_the_paper_says(tmp_path):
    model = random_model(layers=3)  # layer 0 unsplit; layers 1-2 split by the file's roles
    n = model.cfg.tokens_per_frame
    roles = heads_file(tmp_path, [[0.9, 0.9], [0.9, 0.1], [0.1, 0.85]])
    policy = make_policy("forcing_kv", roles_from=roles, retention=0.5)
    seen = KeptFrames()
    budget = 4  # sink 1 + ring floor((4 - 0.5) frames) - 1 = 2 frames + half a frame of stripes
    steps = list(generate(model, RunSettings("a red ball", frames=9, seed=0, steps=1),
                          Controls(policy, budget), observer=seen))
    for frame, kept, counts in seen.after:
        ring = [frame - 1, frame]
        assert kept[0][0] == kept[0][1] == [0, frame - 2, frame - 1, frame]  # layer 0: the whole budget
        assert kept[1][0] == kept[2][1] == [0, frame]  # static: sink + newest
        for dyn in (kept[1][1], kept[2][0]):  # dynamic: sink + ring + stripes of leaving frames
            assert dyn[0] == 0 and dyn[-2:] == ring and len(dyn) <= 5
        assert counts[0].tolist() == [budget * n] * 2
        assert counts[1][0] == counts[2][1] == 2 * n
        assert 3 * n < counts[1][1] == counts[2][0] <= 3 * n + n // 2  # the stripes: half a frame
    report = policy.report()
    assert report["roles"] == f"read from {roles}"
    assert sorted(report["static_heads"]) == [[1, 0], [2, 1]]  # layer 0's never
    first = next(s for s in steps if s.decision is not None)
    assert first.decision_log["info"]["roles"].startswith("read from")
    assert all(s.cache_tokens < budget * n for s in steps if s.decision is not None)


def test_forcing_kv_measures_roles_on_the_fly_and_says_so():
    model = random_model()
    policy = make_policy("forcing_kv", threshold=0.0)  # every split head static
    meter = HeadMeter(model)
    try:
        steps = list(generate(model, RunSettings("a red ball", frames=7, seed=0, steps=1),
                              Controls(policy, 3), observer=meter))
    finally:
        meter.remove()
    view = head_view(meter, policy, steps[-1].decision, 3 * model.cfg.tokens_per_frame)
    assert view["static"].tolist() == [[False, False], [True, True]]  # the policy's roles
    assert view["share"].tolist() == [[1.0, 1.0], [2 / 3, 2 / 3]] and view["score"].shape == (2, 2)
    report = policy.report()
    assert report["roles"].startswith("measured on frames") and report["static_share"] == 1.0
    assert [l for l, _ in report["static_heads"]] == [1, 1]
    n = model.cfg.tokens_per_frame
    assert steps[-1].cache_tokens == (3 * n * 2 + 2 * n * 2) / 4  # layer 0 full, layer 1 sink + newest


def test_forcing_kv_on_wan_holds_the_budget():
    from ffviz.models import load_model
    model = load_model("wan:tiny-random")
    n = model.cfg.tokens_per_frame
    seen = KeptFrames()
    policy = make_policy("forcing_kv", threshold=0.5)
    steps = list(generate(model, RunSettings("a tree in the wind", frames=12, seed=1, steps=1),
                          Controls(policy, 4), observer=seen))
    assert seen.after and all(s.cache_tokens <= 4 * n for s in steps)
    assert all((counts <= 4 * n).all() for _, _, counts in seen.after)
    assert policy.report()["roles"].startswith("measured")


@pytest.mark.parametrize("params,match", [
    ({"threshold": 1.5}, "threshold"),
    ({"stripes": 0}, "stripes"),
    ({"retention": -1.0}, "retention"),
    ({"recent": -1}, "recent"),
    ({"roles_from": ""}, "roles_from"),
    ({"roles_from": "/nonexistent/heads.json"}, "no heads.json"),
    ({"n_recent": 2}, "no parameter 'n_recent'"),
])
def test_forcing_kv_bad_parameters_are_policy_errors(params, match):
    with pytest.raises(PolicyError, match=match):
        make_policy("forcing_kv", **params)


def test_forcing_kv_errors_on_a_budget_too_small_and_a_file_of_another_model(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PolicyError, match="is not a heads.json"):
        make_policy("forcing_kv", roles_from=str(bad))
    model = random_model()
    with pytest.raises(PolicyError, match=r"n_sink \+ one ring frame = 3 frames do not fit"):
        list(generate(model, RunSettings("a red ball", frames=5, seed=0, steps=1),
                      Controls(make_policy("forcing_kv", n_sink=2), 2)))
    small = make_policy("forcing_kv")  # at 2 frames: the sink and the newest, no room for a buffer
    list(generate(model, RunSettings("a red ball", frames=5, seed=0, steps=1), Controls(small, 2)))
    assert small.report()["buffer_stripes"] == []
    other = heads_file(tmp_path, [[0.9] * 3] * 2)
    with pytest.raises(PolicyError, match="this model has"):
        list(generate(model, RunSettings("a red ball", frames=6, seed=0, steps=1),
                      Controls(make_policy("forcing_kv", roles_from=other), 3)))


def test_cli_generate_with_forcing_kv_and_with_adaptive_budgets(tmp_path):
    """The bar: both run within the budget; forcing_kv says where its roles came from."""
    for args in (["--policy", "forcing_kv"],
                 ["--policy", "future_forcing", "--policy-arg", "head_budget=adaptive"]):
        from ffviz.__main__ import main
        out = tmp_path / args[1]
        assert main(["generate", "--frames", "8", "--budget", "3", "--out", str(out), "--no-record",
                     *args]) == 0
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        assert summary["peak_cache_tokens"] <= 4 * 64
        decisions = [json.loads(l) for l in (out / "decisions.jsonl").read_text(encoding="utf-8").splitlines()]
        for d in decisions:
            assert d["tokens_after"] <= 3 * 64
            for layer in d["layers"]:
                assert sum(h["kept"] for h in layer) <= 4 * 3 * 64
        if args[1] == "forcing_kv":
            assert summary["policy_report"]["roles"].startswith("measured")
            assert "roles" in decisions[0]["info"]

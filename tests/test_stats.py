import warnings

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from ffviz.stats import (QueryStats, average_ranks, cosine, drift, frechet_distance, spearman,
                         sym_kl_diag, topb_recall)

rng = np.random.default_rng(0)


def test_frechet_closed_form_and_broadcast():
    mu1, v1 = rng.normal(size=(3, 4, 5)), rng.random((3, 4, 5))
    mu2, v2 = rng.normal(size=(5,)), rng.random((5,))
    got = frechet_distance(mu1, v1, mu2, v2)
    assert got.shape == (3, 4)
    # full-covariance formula with diagonal matrices
    want = ((mu1 - mu2) ** 2).sum(-1) + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum(-1)
    assert np.allclose(got, want)
    assert np.allclose(frechet_distance(mu1, v1, mu1, v1), 0)


def test_sym_kl_is_two_kls():
    mu1, v1, mu2, v2 = rng.normal(size=4), rng.random(4) + .1, rng.normal(size=4), rng.random(4) + .1
    kl = lambda m1, a, m2, b: 0.5 * (np.log(b / a) + (a + (m1 - m2) ** 2) / b - 1).sum()
    assert np.isclose(sym_kl_diag(mu1, v1, mu2, v2, eps=1e-12), kl(mu1, v1, mu2, v2) + kl(mu2, v2, mu1, v1))
    assert np.isfinite(sym_kl_diag(np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3)))


def test_cosine():
    a, b = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    want = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert np.allclose(cosine(a, b), want)
    assert np.allclose(cosine(torch.ones(3), torch.ones(3)), 1.0)
    with pytest.warns(RuntimeWarning, match="zero vector"):
        assert cosine(np.zeros(3), np.ones(3)) == 0.0


@pytest.mark.parametrize("metric", ["frechet", "kl", "cosine"])
@pytest.mark.parametrize("reference", ["first", "running"])
def test_drift_shapes_and_zero_for_stationary(metric, reference):
    F_, L, H, d = 5, 2, 3, 4
    mean, var = rng.normal(size=(L, H, d)), rng.random((L, H, d))
    out = drift(np.broadcast_to(mean, (F_, L, H, d)), np.broadcast_to(var, (F_, L, H, d)), reference, metric)
    assert out.shape == (F_, L, H) and np.allclose(out, 0, atol=1e-9)
    m2, v2 = rng.normal(size=(F_, L, H, d)), rng.random((F_, L, H, d))
    out = drift(m2, v2, reference, metric)
    assert np.isfinite(out).all() and np.allclose(out[0], 0, atol=1e-9) and (out[1:] > 0).all()


def test_drift_references():
    mean, var = rng.normal(size=(4, 1, 1, 3)), rng.random((4, 1, 1, 3))
    first = drift(mean, var, "first", "frechet")
    assert np.isclose(first[2, 0, 0], frechet_distance(mean[2], var[2], mean[0], var[0])[0, 0])
    run = drift(mean, var, "running", "frechet")
    # running fit before frame 3: equal mixture of frames 0, 1, 2
    m = mean[:3].mean(0)
    v = (var[:3] + mean[:3] ** 2).mean(0) - m ** 2
    assert np.isclose(run[3, 0, 0], frechet_distance(mean[3], var[3], m, v)[0, 0])
    assert np.isclose(run[1, 0, 0], first[1, 0, 0])
    with pytest.raises(ValueError, match="metric"):
        drift(mean, var, metric="l2")
    with pytest.raises(ValueError, match="reference"):
        drift(mean, var, reference="last")


def test_drift_degenerate_is_finite():
    mean = np.zeros((3, 1, 2, 4))
    mean[1, 0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning):
        for metric in ("frechet", "kl", "cosine"):
            assert np.isfinite(drift(mean, np.zeros_like(mean), "running", metric)).all()
    assert drift(np.zeros((0, 1, 1, 2)), np.zeros((0, 1, 1, 2))).shape == (0, 1, 1)


def test_spearman_matches_scipy_with_ties():
    a = rng.integers(0, 4, (6, 15)).astype(float)
    b = a + rng.integers(0, 3, (6, 15))
    assert np.allclose(average_ranks(a), rankdata(a, axis=-1) - 1)
    got = spearman(a, b)
    want = [spearmanr(a[i], b[i])[0] for i in range(6)]
    assert np.allclose(got, want)
    assert isinstance(spearman(a[0], b[0]), float)


def test_spearman_degenerate():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert spearman(np.ones(5), np.arange(5)) == 0.0
    with pytest.warns(RuntimeWarning):
        r = spearman(np.array([1.0, np.nan, 3.0]), np.array([1.0, 0.0, 3.0]))
    assert r == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert spearman(np.ones(1), np.ones(1)) == 0.0


def test_topb_recall():
    assert topb_recall([4, 3, 2, 1], [4, 3, 2, 1], 2) == 1.0
    assert topb_recall([1, 2, 3, 4], [4, 3, 2, 1], 2) == 0.0
    assert topb_recall([4, 3, 1, 2], [4, 3, 2, 1], 2) == 1.0
    assert topb_recall([4, 2, 1, 3], [4, 3, 2, 1], 2) == 0.5
    assert topb_recall([1, 2], [2, 1], 5) == 1.0
    out = topb_recall(rng.random((3, 2, 8)), rng.random((3, 2, 8)), 3)
    assert out.shape == (3, 2) and ((out >= 0) & (out <= 1)).all()
    with pytest.raises(ValueError, match="b must be"):
        topb_recall([1, 2], [1, 2], 0)


def test_query_stats_degenerate_inputs():
    s = QueryStats(1, 2, 4)
    vals, vecs = s.top_eig(0, 2)  # no data
    assert torch.isfinite(vals).all() and torch.isfinite(vecs).all() and (vals == 0).all()
    s.update(0, torch.ones(2, 5, 4), frame=0)  # constant queries: zero covariance
    assert torch.isfinite(s.cov(0)).all() and s.cov(0).abs().max() == 0
    vals, vecs = s.top_eig(0, 4)
    assert torch.isfinite(vals).all() and (vals >= 0).all() and torch.isfinite(vecs).all()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s.update(0, torch.full((2, 3, 4), float("nan")), frame=1)
    assert torch.isfinite(s.mean(0)).all() and torch.isfinite(s.cov(0)).all()
    x = torch.randn(2, 6, 1) * torch.ones(1, 1, 4)  # rank-1 data
    s.update(0, x, frame=2)
    vals, vecs = s.top_eig(0, 4)
    assert torch.isfinite(vals).all() and torch.isfinite(vecs).all()


def test_query_stats_half_life_matches_weighted_fit():
    s = QueryStats(1, 1, 2, half_life=1.0)
    a, b = torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    s.update(0, a, frame=0)
    s.update(0, b, frame=1)
    w = torch.cat([torch.full((4,), 0.5), torch.ones(4)]).double()
    x = torch.cat([a[0], b[0]]).double()
    m = (w[:, None] * x).sum(0) / w.sum()
    assert torch.allclose(s.mean(0)[0].double(), m, atol=1e-6)


def test_query_stats_all_layers_at_once():
    s = QueryStats(3, 2, 6)
    for l in range(3):
        s.update(l, torch.randn(2, 10, 6) + l, frame=0)
    vals, vecs = s.top_eig(None, 2)
    assert vals.shape == (3, 2, 2) and vecs.shape == (3, 2, 2, 6)
    for l in range(3):
        v, u = s.top_eig(l, 2)
        assert torch.allclose(v, vals[l], atol=1e-6)
        assert torch.allclose((u * vecs[l]).sum(-1).abs(), torch.ones(2, 2), atol=1e-5)  # same up to sign
        assert torch.allclose(s.cov(l), s.cov_all()[l]) and torch.allclose(s.mean(l), s.mean_all()[l])
    assert s.top_eig(None, 0)[1].shape == (3, 2, 0, 6)

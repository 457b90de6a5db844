import torch

from ffviz.models.rope import Rope3D, apply_rotation, wan_split


def test_wan_split():
    assert wan_split(128) == (44, 42, 42)  # Wan2.1-T2V-1.3B
    assert wan_split(32) == (12, 10, 10)  # the embedded model
    assert sum(wan_split(64)) == 64


def test_rotation_is_orthogonal_and_matches_apply():
    rope = Rope3D(32)
    R = rope.matrix(7, 3, 5)
    assert torch.allclose(R @ R.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    x = torch.randn(32, dtype=torch.float64)
    c, s = rope.cos_sin(7, 3, 5, dtype=torch.float64)
    assert torch.allclose(apply_rotation(x, c, s), R @ x, atol=1e-12)


def test_relative_position_property():
    rope = Rope3D(32)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    def dot(p, pk):
        return (rope.matrix(*p) @ q) @ (rope.matrix(*pk) @ k)
    a = dot((10, 2, 3), (4, 5, 1))
    b = dot((106, 7, 9), (100, 10, 7))  # same offsets (6, -3, 2)
    assert torch.allclose(a, b, atol=1e-9)
    assert not torch.allclose(a, dot((10, 2, 3), (5, 5, 1)), atol=1e-6)


def test_split_assigns_planes_to_axes():
    rope = Rope3D(32)
    # moving only the row must leave the temporal and width planes untouched
    a0, a1 = rope.angles(3, 0, 2), rope.angles(3, 5, 2)
    moved = (a0 != a1).nonzero().flatten()
    assert moved.min() == 6 and moved.max() == 10  # planes 6..10 = dims 12..21


def test_shift_time_equals_recomputing_rope():
    rope = Rope3D(32)
    k = torch.randn(5, 32, dtype=torch.float64)
    c, s = rope.cos_sin(4, 1, 6, dtype=torch.float64)
    c2, s2 = rope.cos_sin(9, 1, 6, dtype=torch.float64)
    shifted = rope.shift_time(apply_rotation(k, c, s), 5)
    assert torch.allclose(shifted, apply_rotation(k, c2, s2), atol=1e-12)


def test_temporal_axis_can_have_its_own_base():
    both = Rope3D(32, theta=10.0, theta_time=10000.0)
    time_planes = both.axis == 0
    assert torch.equal(both.omega[time_planes], Rope3D(32, 10000.0).omega[time_planes])
    assert torch.equal(both.omega[~time_planes], Rope3D(32, 10.0).omega[~time_planes])
    assert torch.equal(Rope3D(32, 10.0, None).omega, Rope3D(32, 10.0).omega)
    R = both.matrix(7, 3, 5)
    assert torch.allclose(R @ R.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    dot = lambda p, pk: (both.matrix(*p) @ q) @ (both.matrix(*pk) @ k)
    assert torch.allclose(dot((10, 2, 3), (4, 5, 1)), dot((106, 7, 9), (100, 10, 7)), atol=1e-9)

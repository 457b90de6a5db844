"""The renderer as teacher: targets that follow from the model's own frames."""
import numpy as np

from ffviz.scenes import Scene, parse_prompt, random_spec
from ffviz.teacher import FAILED, FOUND, HIDDEN, MISSING, read_positions, renderer_targets


def _scene(prompt="a red circle and a blue square on a black background", seed=1):
    return Scene(parse_prompt(prompt)[0], seed)


def test_stepping_reproduces_the_closed_form_trajectories():
    """Scene.step (what the teacher moves objects by) is the closed form, round the torus included."""
    rng = np.random.default_rng(0)
    for i in range(40):
        scene = Scene(random_spec(rng), i)
        pos, vel = scene.positions([0])[0], scene.velocities(0)
        for f in range(1, 120):
            pos, vel = scene.step(pos, vel)
            assert (pos == scene.positions([f])[0]).all(), (i, f)


def test_an_object_is_read_across_the_view_edge_and_beyond_it():
    """Split by the edge (the view wraps), or half out of the view in a scene whose
    objects leave it: both read exactly, from a guess on either side of the edge."""
    scene = _scene("a big red square on a black background")
    scene.pos0[:] = (27, 3)
    frame = scene.render([0])[0]
    for guess in ((27, 3), (29, 5), (25, 1)):
        got, status = read_positions(scene, frame, np.array([guess]))
        assert status.tolist() == [FOUND] and got.tolist() == [[27, 3]]
    leaving = _scene("a big red square on a black background, leaving the view")
    leaving.pos0[:] = (leaving.period[0, 0] - 5, 3)  # 7 px show at the left edge
    frame = leaving.render([0])[0]
    assert (frame == (220, 40, 40)).all(-1).sum() == 7 * 12
    got, status = read_positions(leaving, frame, leaving.pos0 + 2)
    assert status.tolist() == [FOUND] and (got == leaving.pos0).all()


def test_the_truth_is_its_own_target():
    rng = np.random.default_rng(1)
    for i in range(60):
        scene = Scene(random_spec(rng), i)
        start = int(rng.integers(0, 80))
        frames = scene.render(np.arange(start, start + 16))
        targets, valid = renderer_targets(scene, frames, 2, start)
        assert (targets == frames).all() and valid.all(), i


def test_targets_continue_from_where_the_model_drew_an_object():
    scene = _scene()
    pos = scene.positions(np.arange(12))
    pos[5:, 0, 0] += 1  # the model drew the circle one pixel to the right from frame 5 on
    drawn = scene.render_positions(pos)
    targets, valid = renderer_targets(scene, drawn, 2)
    assert valid.all()
    assert not (targets[5] == drawn[5]).all()  # frame 5 follows from the true frame 4
    assert (targets[6:] == drawn[6:]).all()  # later frames follow from the shifted circle


def test_a_misshapen_object_is_redrawn_whole():
    scene = _scene("a big red square on a black background")
    frames = scene.render(np.arange(8))
    x, y = scene.positions([4])[0, 0]
    frames[4, y:y + 2, x:x + 2] = (15, 15, 15)  # a corner bitten off at frame 4
    targets, valid = renderer_targets(scene, frames, 2)
    assert valid.all() and (targets == scene.render(np.arange(8))).all()


def test_a_vanished_object_is_asked_back_where_the_world_puts_it():
    scene = _scene()
    frames = scene.render(np.arange(10))
    frames[6:] = frames[6, 0, 0]  # everything but the background gone from frame 6 on
    targets, valid = renderer_targets(scene, frames, 2)
    assert valid.all()  # nothing was misread: the objects are missing, and asked back
    assert (targets == scene.render(np.arange(10))).all()


def test_no_loss_after_an_object_drawn_where_it_cannot_be_read():
    scene = _scene("a big red square on a black background", seed=2)
    pos = scene.positions(np.arange(10))
    pos[6:, 0] = (pos[6:, 0] + 12) % 20  # frame 6 on: the square far from its place
    frames = scene.render_positions(pos)
    _, valid = renderer_targets(scene, frames, 2)
    assert valid.tolist() == [True] * 7 + [False] * 3  # each frame follows from a misread one
    # redraw_failed: the misread square is asked back whole where it should be
    targets, valid = renderer_targets(scene, frames, 2, redraw_failed=True)
    assert valid.all() and (targets == scene.render(np.arange(10))).all()


def test_reading_tells_hidden_missing_and_misread_objects():
    scene = _scene("a red circle on a black background, leaving the view", seed=3)
    pos = scene.positions([0])[0]
    far = np.array([[40, pos[0, 1]]])  # out of the view: nothing to read
    assert read_positions(scene, scene.render_positions(far[None])[0], far)[1].tolist() == [HIDDEN]
    empty = np.full((32, 32, 3), 15, np.uint8)
    assert read_positions(scene, empty, pos)[1].tolist() == [MISSING]
    got, status = read_positions(scene, scene.render([0])[0], pos + 2)
    assert status.tolist() == [FOUND] and (got == pos).all()  # found within the search radius
    assert read_positions(scene, scene.render([0])[0], pos + 9)[1].tolist() == [FAILED]


def test_the_bounce_probe_scores_exact_moves_and_tells_turns_apart():
    """tools/bounce_probe.py: in this world nothing turns and the truth is right
    everywhere; on a scene made to bounce (as the earlier world did), a video that keeps
    every object moving as it moved is right only away from the turns."""
    import runpy
    from pathlib import Path
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bounce_probe.py"))
    scene = _scene("a small red square on a black background, fast", seed=4)
    T = 40
    counts = tool["score"](scene, scene.render(np.arange(T)), 2)
    assert counts["bounce"][1] == 0 and counts["plain"][0] == counts["plain"][1] > 0
    start, span = scene.pos0.copy(), 32 - 8

    def bouncing(frames):  # a triangle wave between the view's edges
        p = np.mod(start[None] + scene.vel[None] * np.asarray(frames)[:, None, None], 2 * span)
        return np.where(p > span, 2 * span - p, p)

    scene.positions = bouncing
    pos = bouncing(np.arange(T))
    counts = tool["score"](scene, scene.render_positions(pos), 2)
    assert counts["bounce"][1] > 0 and all(right == total for right, total in counts.values())
    straight = pos[:1] + (pos[1] - pos[0])[None] * np.arange(T)[:, None, None]  # never turns
    counts = tool["score"](scene, scene.render_positions(straight), 2)
    assert counts["plain"][0] > 0 and counts["bounce"][0] == 0
    # the cross-entropy split marks the patches a turning object covers, and only those
    turns = [f for f in range(2, T) if (pos[f] - pos[f - 1] != pos[f - 1] - pos[f - 2]).any()]
    marked = tool["bounce_patches"](scene, turns[0], 8, 4)
    assert turns and (marked > 0).sum() >= 4 and set(marked[marked > 0]) == {8}  # the 8-px square
    assert not tool["bounce_patches"](scene, turns[0] - 1, 8, 4).any() or turns[0] - 1 in turns


def test_the_probe_splits_pixels_into_held_emerging_and_left_behind():
    """tools/bounce_probe.py pixel_score: the truth is right on every kind; a video that
    freezes the object fails the pixels it leaves; one that never paints an object back
    from behind the wide pillar fails the emerging pixels and only those."""
    import runpy
    from pathlib import Path
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bounce_probe.py"))
    scene = _scene("a small red square passing behind a wide blue pillar on a black background, fast", seed=2)
    T = 48
    truth = scene.render(np.arange(T))
    counts = tool["pixel_score"](scene, truth, 2)
    assert all(right == total for right, total in counts.values()), counts
    assert all(counts[kind][1] > 0 for kind in tool["PIXEL_KINDS"])
    assert counts["held" + tool["OVERLAP"]][1] == 0  # one object: nothing to overlap
    pos = scene.positions(np.arange(T))
    vis = scene.visibleobject_masks(pos)[:, 0]
    smeared = truth.copy()  # the object stays where it was as well: every pixel it leaves is wrong
    for f in range(1, T):
        smeared[f][vis[f - 1]] = truth[f - 1][vis[f - 1]]
    got = tool["pixel_score"](scene, smeared, 2)
    assert got["left behind"][0] == 0 and got["held"][0] == got["held"][1], got
    _, pillar = scene.object_masks(pos[:1])
    hidden = (vis.sum((1, 2)) == 0).nonzero()[0]
    assert len(hidden) and pillar.any()  # the object does go behind the pillar
    # never painted back: from the frame it was hidden on, the video shows the background where it is
    lost = truth.copy()
    after = np.arange(T) >= hidden[0]
    bg = truth[0][~(vis[0] | pillar[0])][0]
    lost[after[:, None, None] & vis] = bg
    got = tool["pixel_score"](scene, lost, 2)
    assert got["emerging"][0] < got["emerging"][1] and got["left behind"][0] == got["left behind"][1], got


def test_the_probe_counts_overlapping_objects_apart_as_well():
    """Where two objects overlap, their pixels count under the kind and under the kind's
    "objects overlap" twin; the twin is a subset (never more pixels than the kind)."""
    import runpy
    from pathlib import Path
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "bounce_probe.py"))
    # the world's objects move as one and never overlap; two motions are set by hand
    scene = _scene("a big red circle and a big blue square on a black background", seed=0)
    scene.pos0[:] = [[0, 10], [20, 10]]
    scene.vel[:] = [[1, 0], [-1, 0]]
    counts = tool["pixel_score"](scene, scene.render(np.arange(24)), 2)
    assert counts["left behind" + tool["OVERLAP"]][1] > 0, "the objects never overlapped"
    for kind in tool["PIXEL_KINDS"]:
        assert counts[kind + tool["OVERLAP"]][1] <= counts[kind][1]
        assert counts[kind + tool["OVERLAP"]][0] == counts[kind + tool["OVERLAP"]][1]

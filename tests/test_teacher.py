"""The renderer as teacher: targets that follow from the model's own frames."""
import numpy as np

from ffviz.scenes import Scene, parse_prompt, random_spec
from ffviz.teacher import read_positions, renderer_targets


def _scene(prompt="a red circle and a blue square on a black background", seed=1):
    return Scene(parse_prompt(prompt)[0], seed)


def test_stepping_reproduces_the_closed_form_trajectories():
    """Scene.step (what the teacher moves objects by) is the closed form, bounces included."""
    rng = np.random.default_rng(0)
    for i in range(40):
        scene = Scene(random_spec(rng), i)
        pos, vel = scene.positions([0])[0], scene.velocities(0)
        for f in range(1, 120):
            pos, vel = scene.step(pos, vel)
            assert (pos == scene.positions([f])[0]).all(), (i, f)


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


def test_no_loss_after_an_object_vanished():
    scene = _scene()
    frames = scene.render(np.arange(10))
    frames[6] = frames[6, 0, 0]  # everything but the background gone at frame 6
    _, valid = renderer_targets(scene, frames, 2)
    assert valid.tolist() == [True] * 7 + [False] + [True] * 2  # frame 7 follows from 6


def test_reading_ignores_a_hidden_object_and_fails_on_a_missing_one():
    scene = _scene("a red circle on a black background, leaving the view", seed=3)
    pos = scene.positions([0])[0]
    far = np.array([[40, pos[0, 1]]])  # out of the view: nothing to read
    assert read_positions(scene, scene.render_positions(far[None])[0], far)[1].tolist() == [0]
    empty = np.full((32, 32, 3), 15, np.uint8)
    assert read_positions(scene, empty, pos)[1].tolist() == [-1]
    got, status = read_positions(scene, scene.render([0])[0], pos + 2)
    assert status.tolist() == [1] and (got == pos).all()  # found within the search radius

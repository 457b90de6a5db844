"""tools/edge_crossing_probe.py: which edge a frame's objects cross."""
import runpy
from pathlib import Path

from ffviz.scenes import Scene, parse_prompt

TOOL = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "edge_crossing_probe.py"))

def test_crossings_are_told_apart():
    scene = Scene(parse_prompt("a big red square on a black background")[0], 0)
    scene.vel[:] = [[1, 1]]
    for start, kind in (((4, 4), "none"), ((25, 4), "left or right"), ((4, 25), "top or bottom"),
                        ((25, 25), "both")):
        scene.pos0[:] = [start]
        assert TOOL["crossing"](scene, 0) == kind
    scene.pos0[:] = [[19, 4]]  # 12 px from x = 19: inside until frame 1, across from frame 2
    assert [TOOL["crossing"](scene, f) for f in (0, 1, 2)] == ["none", "none", "left or right"]
    assert set(TOOL["KINDS"]) == {"top or bottom", "left or right", "both", "none"}

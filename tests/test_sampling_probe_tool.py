"""tools/sampling_probe.py: free-running quality under sampling settings of the motion choice."""
import json
import runpy
from pathlib import Path

import pytest

from ffviz.weights import save_weights
from tests.conftest import random_model
from tests.test_one_motion import MOTION

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sampling_probe.py"


def test_each_setting_is_measured_and_the_card_is_left_as_it_was(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_weights(random_model(**MOTION), path, {"steps": 1})
    main = runpy.run_path(str(TOOL))["main"]
    main([str(path), "--seeds", "0-1", "--frames", "5", "--settings", "off", "on:2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["one_motion"], r["recall_bias"]) for r in lines] == [(False, 0.0), (True, 2.0)]
    assert all(len(r["per_seed"]["tracking"]) == 2 and 0 <= r["background"] <= 1 for r in lines)
    for bad, why in ((["--settings", "maybe"], "on or off"), (["--settings", "on:x"], "a number"),
                     (["--seeds", "a-b"], "seeds"), (["--frames", "1"], "at least 3")):
        with pytest.raises(SystemExit, match=why):
            main([str(path), *bad])
    plain = tmp_path / "plain" / "tiny.safetensors"
    save_weights(random_model(), plain, {"steps": 1})
    with pytest.raises(SystemExit, match="nothing to keep"):
        main([str(plain)])

"""tools/recall_probe.py counts recall's choices right."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import recall_probe  # noqa: E402
from tests.conftest import random_model  # noqa: E402
from tests.test_recall import recall_model  # noqa: E402


def test_the_probe_counts_picks_and_wrong_picks():
    model = recall_model()
    with torch.no_grad():
        model.recall_choice[2].bias.fill_(1e3)  # recall picked wherever it found something
    always = recall_probe.probe(model, batches=1, batch=2)
    assert always["picked_where_taught"] == always["taught"]
    assert always["wrong_picks"] > 0  # a random model's recall is off on many patches
    assert sum(k["taught"] for k in always["by_scene"].values()) >= always["taught"]
    with torch.no_grad():
        model.recall_choice[2].bias.fill_(-1e3)
    never = recall_probe.probe(model, batches=1, batch=2)
    assert never["taught"] == always["taught"]  # what is taught does not depend on the choice
    assert never["picked_where_taught"] == 0 and never["wrong_picks"] == 0
    with pytest.raises(ValueError, match="no recall"):
        recall_probe.probe(random_model(), batches=1, batch=2)

"""tools/recall_probe.py counts recall's choices right."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import recall_probe  # noqa: E402
from tests.conftest import random_model  # noqa: E402
from tests.test_recall import recall_model  # noqa: E402


def test_the_probe_counts_picks_and_wrong_picks(monkeypatch):
    # a random model trusts every cached patch alike, so its recall blends the lags and
    # rarely gives a patch exactly: a loose bar makes it taught wherever it beats the
    # displacements, so that the counts below count something
    monkeypatch.setattr("ffviz.models.tiny.RECALL_GIVES", 10.0)
    model = recall_model()
    with torch.no_grad():
        model.recall_choice[2].bias.fill_(1e3)  # recall picked wherever it found something
    always = recall_probe.probe(model, batches=1, batch=8)
    assert always["picked_where_taught"] == always["taught"] > 0
    assert always["wrong_picks"] > 0  # a random model's recall is off on many patches
    assert sum(k["taught"] for k in always["by_scene"].values()) >= always["taught"]
    with torch.no_grad():
        model.recall_choice[2].bias.fill_(-1e3)
    never = recall_probe.probe(model, batches=1, batch=8)
    assert never["taught"] == always["taught"]  # what is taught does not depend on the choice
    assert never["picked_where_taught"] == 0 and never["wrong_picks"] == 0
    assert never["taught_share"] == always["taught_share"] > 0
    with pytest.raises(ValueError, match="no recall"):
        recall_probe.probe(random_model(), batches=1, batch=2)


def test_the_probe_counts_the_lag_picks_right():
    """A pick that ranks the longest found lag first is right on some patches where the
    reads disagree, one that ranks the mean first on none (the mean never gives a patch
    where the found reads disagree, on true clips)."""
    from tests.test_recall_lag_pick import lag_pick_model, rank_longest_lag_first
    model = lag_pick_model()
    on_mean = recall_probe.probe(model, batches=1, batch=8)
    assert on_mean["lag_pick_telling"] > 0 and on_mean["lag_pick_right"] == 0
    rank_longest_lag_first(model)
    longest = recall_probe.probe(model, batches=1, batch=8)
    assert longest["lag_pick_telling"] == on_mean["lag_pick_telling"]
    assert 0 < longest["lag_pick_right_share"] <= 1
    assert "lag_pick_telling" not in recall_probe.probe(recall_model(), batches=1, batch=2)

"""The ray backend in this process, on a local Ray of 2 CPUs: the same rows as the
local backend, a failed task retried, a model that cannot load stops the sweep."""
import os

import pytest

from ffviz.models import ModelError
from ffviz.models.tiny import TinyVideoModel
from ffviz.sweep import run_sweep
from ffviz.sweep_backends import gpus_per_task
from tests.conftest import random_model
from tests.test_sweep import quality, read_rows, small_grid

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray of 2 CPUs for the module (the sweep uses it, and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_sweep(random_model(), small_grid(), out, show_progress=False)
    return read_rows(out / "runs.csv"), read_rows(out / "results.csv")


def test_the_same_rows_as_the_local_backend(local_rows, tmp_path):
    summary = run_sweep(random_model(), small_grid(), tmp_path, backend="ray", show_progress=False)
    assert summary["backend"] == "ray" and summary["failed_runs"] == 0
    assert quality(read_rows(tmp_path / "runs.csv")) == quality(local_rows[0])
    assert quality(read_rows(tmp_path / "results.csv")) == quality(local_rows[1])
    assert ray.is_initialized()  # a Ray the caller started is left running


class FlakyModel(TinyVideoModel):
    """Fails the first run that any worker starts (a marker file says one did)."""
    marker: str

    def embed_condition(self, cond_ids, motion=None, one_motion=None):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().embed_condition(cond_ids, motion, one_motion)
        raise RuntimeError("a worker fell over")


def test_a_failed_task_is_retried(local_rows, tmp_path):
    model = random_model()
    model.__class__, model.marker = FlakyModel, str(tmp_path / "failed-once")
    heard = []
    summary = run_sweep(model, small_grid(), tmp_path / "out", backend="ray", show_progress=False,
                        log=heard.append)
    assert os.path.exists(model.marker) and summary["failed_runs"] == 0
    assert len(heard) == 1 and "a worker fell over" in heard[0] and "again" in heard[0]
    assert quality(read_rows(tmp_path / "out" / "runs.csv")) == quality(local_rows[0])


def test_workers_load_a_wan_model_by_name(tmp_path):
    """wan:tiny-random (CPU): free-text prompts, a model each worker loads itself."""
    config = small_grid(policies=["full", "window", "future_forcing"], seeds=[0],
                        prompts=["a corgi running along a beach"])
    run_sweep("wan:tiny-random", config, tmp_path / "local", show_progress=False)
    summary = run_sweep("wan:tiny-random", config, tmp_path / "ray", backend="ray",
                        show_progress=False)
    assert summary["failed_runs"] == 0 and summary["model"] == "wan:tiny-random"
    rows = read_rows(tmp_path / "ray" / "runs.csv")
    assert len(rows) == 3 and rows[0]["consistency"] == ""  # no scene metrics for Wan
    assert quality(rows) == quality(read_rows(tmp_path / "local" / "runs.csv"))


def test_a_model_that_does_not_load_on_the_workers_stops_the_sweep(tmp_path):
    with pytest.raises(ModelError, match="nonexistent"):
        run_sweep("tiny:/nonexistent.safetensors", small_grid(), tmp_path, backend="ray",
                  show_progress=False)


def test_resources_per_task():
    assert gpus_per_task("wan:ckpt/self_forcing_dmd.pt") == 1
    assert gpus_per_task("wan:base.pt+lora.pt") == 1
    assert gpus_per_task("wan:tiny-random") == 0
    assert gpus_per_task("tiny") == gpus_per_task(random_model()) == 0

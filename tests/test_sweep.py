"""The sweep on the local backend: runs stored as they finish, resumed, retried once,
failures recorded; the CLI's backends give the same rows (Ray: tests/test_sweep_ray.py
for the in-process ones; here the CLI, in a subprocess, on a local Ray of 2 CPUs)."""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest

import ffviz.evaluate
import ffviz.sweep_backends
from ffviz.evaluate import TIMING_COLUMNS, EvalConfig, EvalError, grid_runs, run_key
from ffviz.sweep import check_backend, run_sweep
from ffviz.sweep_store import UnitStore
from tests.conftest import random_model

PROMPT = "a red circle and a blue square on a green background with a gray pillar"


@pytest.fixture(scope="module")
def model():
    return random_model()


def small_grid(**kw) -> EvalConfig:
    return EvalConfig(**{"policies": ["full", "window", "oracle"], "budgets": [2], "seeds": [0, 1],
                         "frames": 6, "prompts": [PROMPT], "horizon": 2, **kw})


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def quality(rows: list[dict]) -> list[dict]:
    """The columns two sweeps of one grid agree on: all but the measured times."""
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def whole(model, tmp_path_factory):
    """The small grid swept once, from scratch."""
    out = tmp_path_factory.mktemp("whole")
    summary = run_sweep(model, small_grid(), out, show_progress=False)
    return out, summary


def test_every_run_is_stored_under_runs(whole):
    out, summary = whole
    assert summary["runs"] == 6 and summary["failed_runs"] == 0 and summary["runs_resumed"] == 0
    assert summary["backend"] == "local"
    units = sorted((out / "runs").glob("*.json"))
    assert len(units) == 2  # one per (prompt, seed)
    stored = [json.loads(p.read_text(encoding="utf-8")) for p in units]
    assert sorted(u["seed"] for u in stored) == [0, 1]
    assert all(len(u["rows"]) == 3 and not u["failed"] for u in stored)
    assert not list((out / "runs").glob(".unit-*"))  # no temporary file left


def test_a_rerun_skips_what_is_stored(whole, model, tmp_path, monkeypatch):
    """Remove one unit's file and one run of the other: only those run again, and the
    tables are the same rows."""
    out, _ = whole
    rerun = tmp_path / "rerun"
    import shutil
    shutil.copytree(out / "runs", rerun / "runs")
    seed0, seed1 = (next(p for p in (rerun / "runs").glob(f"seed{s}-*.json")) for s in (0, 1))
    seed1.unlink()
    unit = json.loads(seed0.read_text(encoding="utf-8"))
    dropped = next(k for k in unit["rows"] if k.startswith("window|"))
    del unit["rows"][dropped]
    seed0.write_text(json.dumps(unit), encoding="utf-8")

    ran = []
    real = ffviz.sweep_backends.evaluate_unit

    def spy(model, config, prompt, seed, skip=frozenset(), progress=None):
        for row in real(model, config, prompt, seed, skip, progress):
            ran.append((seed, row["policy"]))
            yield row
    monkeypatch.setattr(ffviz.sweep_backends, "evaluate_unit", spy)
    summary = run_sweep(model, small_grid(), rerun, show_progress=False)
    assert sorted(ran) == [(0, "window"), (1, "full"), (1, "oracle"), (1, "window")]
    assert summary["runs_resumed"] == 2
    assert quality(read_rows(rerun / "runs.csv")) == quality(read_rows(out / "runs.csv"))
    assert quality(read_rows(rerun / "results.csv")) == quality(read_rows(out / "results.csv"))

    ran.clear()  # a third sweep finds everything done
    assert run_sweep(model, small_grid(), rerun, show_progress=False)["runs_resumed"] == 6
    assert ran == []
    # stored runs belong to their world: after it changes, everything runs anew
    monkeypatch.setattr(ffviz.sweep, "WORLD_VERSION", ffviz.sweep.WORLD_VERSION + 1)
    assert run_sweep(model, small_grid(), rerun, show_progress=False)["runs_resumed"] == 0
    assert len(ran) == 6


def test_other_settings_start_fresh(whole, model, tmp_path):
    out, _ = whole
    from ffviz.sweep import store_settings
    store = UnitStore(out / "runs", store_settings(model.name, None, 6, 2, "all"))
    other = UnitStore(out / "runs", store_settings(model.name, None, 8, 2, "all"))
    assert len(store.done(PROMPT, 0)) == 3 and other.done(PROMPT, 0) == set()
    assert store.path(PROMPT, 0) != other.path(PROMPT, 0)


def test_an_unreadable_unit_file_is_redone(tmp_path):
    settings = {"model": "m", "frames": 6, "horizon": 2, "query_steps": "all"}
    heard = []
    store = UnitStore(tmp_path, settings, log=heard.append)
    row = {"policy": "window", "budget": 2, "policy_params": "{}", "seed": 0, "error": "",
           "step_ms": float("nan"), "rollout_psnr_vs_full": float("inf")}
    store.add(PROMPT, 0, row)
    back = UnitStore(tmp_path, settings).row(PROMPT, 0, row)
    assert back["rollout_psnr_vs_full"] == float("inf") and back["step_ms"] != back["step_ms"]
    store.path(PROMPT, 0).write_text("{not json", encoding="utf-8")
    assert UnitStore(tmp_path, settings, log=heard.append).done(PROMPT, 0) == set()
    assert "unreadable" in heard[0]


def _failing(monkeypatch, should_fail):
    """Make ``_one_run`` raise where ``should_fail(seed, policy name, calls so far)``."""
    real, calls = ffviz.evaluate._one_run, []

    def one_run(model, prompt, seed, frames, policy, *a, **kw):
        calls.append((seed, policy.name))
        if should_fail(seed, policy.name, calls):
            raise RuntimeError(f"injected failure at seed {seed}, {policy.name}")
        return real(model, prompt, seed, frames, policy, *a, **kw)
    monkeypatch.setattr(ffviz.evaluate, "_one_run", one_run)
    return calls


def test_a_failed_unit_is_retried_once_without_its_finished_runs(whole, model, tmp_path,
                                                                 monkeypatch):
    out, _ = whole
    heard = []
    # the oracle run of seed 0 fails the first time only
    calls = _failing(monkeypatch, lambda seed, name, calls:
                     (seed, name) == (0, "oracle") and calls.count((0, "oracle")) == 1)
    summary = run_sweep(model, small_grid(), tmp_path, show_progress=False, log=heard.append)
    assert summary["failed_runs"] == 0
    # seed 0: reference, window, oracle (fails); seed 1; seed 0 again: reference, oracle
    assert calls == [(0, "full"), (0, "window"), (0, "oracle"), (1, "full"), (1, "window"),
                     (1, "oracle"), (0, "full"), (0, "oracle")]
    assert len(heard) == 1 and "injected failure" in heard[0] and "again" in heard[0]
    assert quality(read_rows(tmp_path / "runs.csv")) == quality(read_rows(out / "runs.csv"))


def test_a_unit_that_fails_twice_is_recorded_and_the_sweep_goes_on(whole, model, tmp_path,
                                                                   monkeypatch):
    out, _ = whole
    heard = []
    calls = _failing(monkeypatch, lambda seed, name, calls: (seed, name) == (0, "window"))
    summary = run_sweep(model, small_grid(), tmp_path, show_progress=False, log=heard.append)
    assert calls.count((0, "window")) == 2 and calls.count((1, "oracle")) == 1
    rows = {(r["seed"], r["policy"]): r for r in read_rows(tmp_path / "runs.csv")}
    # seed 0's full run was stored before the failure; its window and oracle runs failed
    assert rows[("0", "full")]["error"] == ""
    for name in ("window", "oracle"):
        assert rows[("0", name)]["error"].startswith("task failed 2 times: RuntimeError: injected")
        assert rows[("0", name)]["consistency"] == ""
    assert all(rows[("1", n)]["error"] == "" for n in ("full", "window", "oracle"))
    assert summary["failed_runs"] == 2 and "recorded as failed" in heard[-1]
    stored = json.loads(next((tmp_path / "runs").glob("seed0-*.json")).read_text(encoding="utf-8"))
    assert len(stored["rows"]) == 1 and len(stored["failed"]) == 2

    # a rerun tries the failed runs again (only those), and they now succeed
    monkeypatch.undo()
    summary = run_sweep(model, small_grid(), tmp_path, show_progress=False)
    assert summary["failed_runs"] == 0 and summary["runs_resumed"] == 4
    assert quality(read_rows(tmp_path / "runs.csv")) == quality(read_rows(out / "runs.csv"))


def test_settings_the_model_cannot_take_stop_before_any_run(tmp_path):
    with pytest.raises(EvalError, match="given frames"):
        run_sweep(random_model(given_frames=6), small_grid(), tmp_path, show_progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend,address,cpus,msg", [
    ("cluster", None, None, "backend must be one of"),
    ("local", "auto", None, "are for --backend ray"),
    ("local", None, 2, "are for --backend ray"),
    ("ray", "ray://head:10001", None, "Ray Client"),
    ("ray", "auto", 2, "local Ray"),
    ("ray", None, 0, "must be >= 1"),
])
def test_bad_backend_settings(backend, address, cpus, msg):
    with pytest.raises(EvalError, match=msg):
        check_backend(backend, address, cpus)


def test_ray_missing_is_a_clear_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(EvalError, match="needs Ray: pip install"):
        check_backend("ray", None, None)


def test_grid_runs_name_a_run_by_its_parameters():
    a = grid_runs(small_grid(), {"full": {}, "window": {}, "oracle": {}})
    b = grid_runs(small_grid(), {"full": {}, "window": {}, "oracle": {"n_sink": 1}})
    assert run_key(a[0]) == run_key(b[0])
    assert run_key(a[2]) != run_key(b[2])  # other oracle parameters: another run
    # the window's runs carry the scorers' shared-cache fidelity (the oracle's among them)
    assert run_key(a[1]) != run_key(b[1]) and a[1]["shared_key"]
    c = grid_runs(small_grid(fidelity_reference="none"), {"full": {}, "window": {}, "oracle": {}})
    assert run_key(c[1]) == "window|2|{}"


# -- the CLI, in a subprocess --------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Small random weights (what is tested is the sweep, not the model)."""
    from ffviz.weights import save_weights
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(random_model(width=32, layers=1), path, {"steps": 0})
    return path


def cli(weights, out, *extra, wait=True):
    argv = [sys.executable, "-m", "ffviz", "eval", "--policies", "window,future_forcing",
            "--budgets", "2", "--seeds", "0,1", "--frames", "8", "--prompts", PROMPT,
            "--weights", str(weights), "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local_cli(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-local")
    r = cli(weights, out)
    assert r.returncode == 0, r.stderr
    return out


def test_cli_ray_backend_gives_the_same_rows(weights, local_cli, tmp_path):
    pytest.importorskip("ray")
    r = cli(weights, tmp_path, "--backend", "ray", "--ray-cpus", "2")
    assert r.returncode == 0, r.stderr
    assert "4/4 [" in r.stderr  # progress: runs done / total [elapsed<left]
    for table in ("results.csv", "runs.csv"):
        ray_rows, local_rows = read_rows(tmp_path / table), read_rows(local_cli / table)
        assert len(ray_rows) == 4 and quality(ray_rows) == quality(local_rows), table
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["backend"] == "ray"


def test_cli_killed_sweep_resumes(weights, local_cli, tmp_path):
    """Killed once a run is stored, the sweep keeps that run: the rerun runs the rest."""
    p = cli(weights, tmp_path, wait=False)
    deadline = time.time() + 240
    stored = 0
    while time.time() < deadline and p.poll() is None:
        units = [json.loads(f.read_text(encoding="utf-8")) for f in (tmp_path / "runs").glob("seed*.json")] \
            if (tmp_path / "runs").is_dir() else []
        stored = sum(len(u["rows"]) for u in units)
        if stored:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert stored >= 1
    r = cli(weights, tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert summary["runs_resumed"] >= stored
    assert quality(read_rows(tmp_path / "runs.csv")) == quality(read_rows(local_cli / "runs.csv"))


def test_new_weights_do_not_resume_the_old_weights_runs(weights, tmp_path):
    """Stored runs belong to their weights: the same command after the weights file was
    replaced runs every run anew; with the same weights it resumes them all (both
    backends name the weights alike: the ray test resumes what local stored)."""
    import shutil
    from ffviz.weights import save_weights
    mine = tmp_path / "w" / weights.name
    mine.parent.mkdir()
    shutil.copy(weights, mine)
    shutil.copy(weights.with_suffix(".json"), mine.with_suffix(".json"))
    folder = tmp_path / "eval"
    for expected in (0, 4):
        r = cli(mine, folder)
        assert r.returncode == 0, r.stderr
        assert json.loads((folder / "eval.json").read_text(encoding="utf-8"))["runs_resumed"] == expected
    changed = random_model(width=32, layers=1)
    changed.head.bias.data += 0.01  # new weights under the same name
    save_weights(changed, mine, {"steps": 1})
    r = cli(mine, folder)
    assert r.returncode == 0, r.stderr
    assert json.loads((folder / "eval.json").read_text(encoding="utf-8"))["runs_resumed"] == 0


def test_cli_exit_code_says_a_run_failed(weights, tmp_path):
    """A run that cannot run (protected frames beyond the budget) is recorded; exit 1."""
    r = subprocess.run([sys.executable, "-m", "ffviz", "eval", "--policies", "window,oracle",
                        "--budgets", "1", "--seeds", "0", "--frames", "5", "--prompts", PROMPT,
                        "--policy-arg", "oracle:n_sink=1", "--policy-arg", "oracle:n_recent=1",
                        "--weights", str(weights), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "1 runs failed" in r.stderr, r.stderr
    rows = {x["policy"]: x for x in read_rows(tmp_path / "runs.csv")}
    assert rows["window"]["error"] == "" and "do not fit" in rows["oracle"]["error"]


@pytest.mark.parametrize("args,msg", [
    (["--address", "auto"], "are for --backend ray"),
    (["--backend", "ray", "--address", "ray://head:10001"], "Ray Client"),
    (["--backend", "ray", "--ray-cpus", "0"], "must be >= 1"),
])
def test_cli_bad_backend_exits_2_before_loading(tmp_path, capsys, args, msg):
    from ffviz.__main__ import main
    code = main(["eval", "--out", str(tmp_path / "x"), "--weights", "/nonexistent.safetensors", *args])
    assert code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

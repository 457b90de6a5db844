"""A sweep: the evaluation grid run to its tables, resumable, on a backend.

``run_sweep`` cuts the grid (``evaluate.EvalConfig``) into units, one per prompt
and seed (``evaluate.evaluate_unit``: a full-cache reference run, then every policy
x budget run measured against it), and hands them to a backend
(``sweep_backends``: ``local`` runs them here one after the other, ``ray`` as Ray
tasks across a cluster). As each run finishes its row is stored under ``DIR/runs/``
(``sweep_store``); a rerun with the same ``DIR`` runs only what is not stored. The
tables (``eval_report``: runs.csv, results.csv, results.md, ...) are then rebuilt from
the store in grid order, so they do not depend on which unit finished first, nor on
the backend: only the timing columns differ between two sweeps.

Failures: a policy that cannot run at a budget is a result (a row with ``error``),
as in ``evaluate``. A unit whose task raises, or whose worker dies, is run again
once, skipping the runs it finished; if it fails again, its unfinished runs are
stored as failed rows with the error and the sweep goes on (a rerun tries them
again). Errors that say the settings cannot work (a model that does not load,
frames the model cannot take) stop the sweep: no retry would help.
"""
from __future__ import annotations

import collections
import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ffviz.eval_report import write_results
from ffviz.evaluate import (EvalConfig, EvalError, check_fits, describe_run, error_row,
                            grid_runs, reference_query_bytes, run_key)
from ffviz.generate import GenerationError
from ffviz.models import ModelError, has_scenes
from ffviz.scenes import WORLD_VERSION, PromptError
from ffviz.sweep_backends import LocalBackend, RayBackend, RunFinished, Unit
from ffviz.sweep_store import UnitStore

BACKENDS = ("local", "ray")
ATTEMPTS = 2  # a failed unit is retried once
SETTINGS_ERRORS = (GenerationError, ModelError, PromptError)  # stop the sweep: retrying cannot help


def check_backend(backend: str, address: str | None, ray_cpus: int | None) -> None:
    """Backend settings that cannot work (``EvalError``), before any work."""
    if backend not in BACKENDS:
        raise EvalError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "local" and (address is not None or ray_cpus is not None):
        raise EvalError("--address and --ray-cpus are for --backend ray")
    if backend != "ray":
        return
    if address is not None and address.startswith("ray://"):
        raise EvalError("a ray:// address (Ray Client) cannot stream a sweep's runs back: run the "
                        "sweep on the cluster instead, e.g. ray job submit --working-dir . -- "
                        "python -m ffviz eval ... --backend ray --address auto (docs/ray.md)")
    if address is not None and ray_cpus is not None:
        raise EvalError("--ray-cpus is for the local Ray started without --address")
    if ray_cpus is not None and ray_cpus < 1:
        raise EvalError(f"--ray-cpus must be >= 1, got {ray_cpus}")
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        raise EvalError("--backend ray needs Ray: pip install -r requirements.txt "
                        "-c constraints.txt (or pip install 'ray>=2.50')")


def _warn(msg: str) -> None:
    tqdm.write(f"warning: {msg}", file=sys.stderr)


def _cause(error: BaseException) -> BaseException:
    """The exception a task raised (Ray hands it over wrapped, as ``cause``)."""
    return getattr(error, "cause", None) or error


def _one_line(error: BaseException) -> str:
    """``Type: message`` for a table cell and a log line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def run_sweep(model, config: EvalConfig, out_dir: Path, backend: str = "local",
              address: str | None = None, ray_cpus: int | None = None, threads: int = 1,
              log=_warn, show_progress: bool = True, report=write_results) -> dict:
    """Run what the grid still lacks in ``out_dir`` and write its tables; returns eval.json's
    content. ``model``: a name (``models.load_model``; the ray backend loads it in each
    worker) or a loaded model. ``threads``: torch threads (and CPUs) of each ray task; the
    local backend runs with this process's. ``log(msg)``: failures and retries.
    ``report``: writes the files (``eval_report.write_results``'s arguments and result)."""
    started = time.perf_counter()
    check_backend(backend, address, ray_cpus)
    label = model if isinstance(model, str) else model.name
    weights = weights_identity(model)  # by name, before it is loaded
    runs = grid_runs(config, config.validate(scenes=has_scenes(label) if isinstance(model, str)
                                             else model.has_scenes))
    if backend == "local" and isinstance(model, str):
        from ffviz.models import load_model
        model = load_model(model)
    if not isinstance(model, str):
        check_fits(model, config)
    units = [Unit(p, s) for p in config.prompts for s in config.seeds]
    store = UnitStore(Path(out_dir) / "runs",
                      store_settings(label, weights, config.frames, config.horizon, config.query_steps), log)
    missing = {u: [r for r in runs if run_key(r) not in store.done(u.prompt, u.seed)] for u in units}
    todo = [u for u in units if missing[u]]
    total, resumed = len(units) * len(runs), sum(len(runs) - len(missing[u]) for u in units)
    if todo:
        runner = (LocalBackend(model, config) if backend == "local" else
                  RayBackend(model, config, threads=threads, address=address, num_cpus=ray_cpus))
        try:
            with tqdm(total=total, initial=resumed, unit="run", desc=f"eval ({backend})",
                      file=sys.stderr, disable=not show_progress) as bar:
                _drive(runner, todo, runs, store, bar, log)
        finally:
            runner.close()
    rows = [store.row(u.prompt, u.seed, r) or error_row(u.prompt, u.seed, r, "not run")
            for u in units for r in runs]
    about = {"model": label, "backend": backend, "address": address, "runs_resumed": resumed,
             "torch_threads": threads if backend == "ray" else _torch_threads(),
             "reference_query_bytes": None if isinstance(model, str)
             else reference_query_bytes(model.cfg, config)}
    return report(out_dir, rows, config, time.perf_counter() - started, about)


def store_settings(label: str, weights, frames: int, horizon: int, query_steps: str) -> dict:
    """What every stored row of a sweep depends on besides its prompt and seed: the model,
    its weights, the world its scenes are drawn in, and the run settings."""
    return {"model": label, "weights": weights, "world": WORLD_VERSION, "frames": frames,
            "horizon": horizon, "query_steps": query_steps}


def weights_identity(model) -> str | None:
    """What a stored run depends on in the model besides its name: the embedded model's
    weights, by the sha256 of its card, and the card's config (its sampling settings:
    steps, snapping, one motion, recall's bias), so that a rerun after new weights or
    settings runs anew instead of mixing their rows with the old ones; None where
    unknown (a model passed loaded: the caller keeps its folders apart)."""
    if not isinstance(model, str):
        return None
    kind, _, spec = model.partition(":")
    if kind != "tiny":
        return None
    from ffviz.weights import DEFAULT_WEIGHTS, WeightsError, read_card
    try:
        card = read_card(Path(spec) if spec else DEFAULT_WEIGHTS)
    except (WeightsError, OSError):
        return None  # loading it fails with its own message
    config = json.dumps(card.get("config"), sort_keys=True)
    return f"{card.get('sha256')}:{hashlib.sha256(config.encode()).hexdigest()[:16]}"


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _drive(backend, units: list[Unit], runs: list[dict], store: UnitStore, bar, log) -> None:
    """Submit ``units``, store each run as it finishes, retry a failed unit once."""
    attempts = collections.Counter()
    for u in units:
        backend.submit(u, store.done(u.prompt, u.seed))
    for event in backend.events():
        u = event.unit
        if isinstance(event, RunFinished):
            store.add(u.prompt, u.seed, event.row)
            bar.update(1)
            if event.row["error"]:
                log(f"{describe_run(event.row)}: {event.row['error']}")
            continue
        cause = _cause(event.error)
        if isinstance(cause, SETTINGS_ERRORS):
            raise cause
        attempts[u] += 1
        what = f"seed {u.seed}, prompt {u.prompt!r} failed ({_one_line(cause)})"
        done = store.done(u.prompt, u.seed)
        if attempts[u] < ATTEMPTS:
            log(f"{what}: running it again")
            backend.submit(u, done)
            continue
        left = [r for r in runs if run_key(r) not in done]
        store.fail(u.prompt, u.seed, [error_row(u.prompt, u.seed, r, f"task failed {ATTEMPTS} "
                                                f"times: {_one_line(cause)}") for r in left])
        bar.update(len(left))
        log(f"{what} again: {len(left)} runs recorded as failed; the sweep goes on")

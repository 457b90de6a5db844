"""Where a sweep's units run: in this process (``local``) or as Ray tasks (``ray``).

A backend is handed units (``submit``: a prompt and seed, and the runs already
stored) and reports what happens as it happens (``events``): each finished run
(``RunFinished``) and each unit whose task raised or whose worker died
(``UnitFailed``). It decides nothing: storing, retrying and giving up belong to the
sweep (``ffviz/sweep.py``). Both run the same ``evaluate.evaluate_unit``, so the rows
are the same wherever a unit ran.

Ray is imported only by ``RayBackend``: nothing else in the project needs it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Iterator

from ffviz.evaluate import EvalConfig, EvalError, evaluate_unit


@dataclasses.dataclass(frozen=True)
class Unit:
    """The grid's unit of work: a reference run and the policy runs measured on it."""
    prompt: str
    seed: int


@dataclasses.dataclass
class RunFinished:
    unit: Unit
    row: dict


@dataclasses.dataclass
class UnitFailed:
    unit: Unit
    error: BaseException


class LocalBackend:
    """Units one after the other, in submission order, in this process."""
    name = "local"

    def __init__(self, model, config: EvalConfig):
        self.model, self.config = model, config
        self.queue: collections.deque[tuple[Unit, frozenset]] = collections.deque()

    def submit(self, unit: Unit, skip: set[str]) -> None:
        self.queue.append((unit, frozenset(skip)))

    def events(self) -> Iterator[RunFinished | UnitFailed]:
        while self.queue:  # a unit submitted meanwhile (a retry) runs too
            unit, skip = self.queue.popleft()
            try:
                for row in evaluate_unit(self.model, self.config, unit.prompt, unit.seed, skip):
                    yield RunFinished(unit, row)
            except Exception as e:
                yield UnitFailed(unit, e)

    def close(self) -> None:
        pass


def gpus_per_task(model) -> int:
    """A Wan checkpoint takes a GPU per task; the tiny model and wan:tiny-random run on CPU."""
    if isinstance(model, str):
        from ffviz.models.wan import TINY_RANDOM
        kind, _, spec = model.partition(":")
        return int(kind == "wan" and spec != TINY_RANDOM)
    return int(any(p.is_cuda for p in model.parameters()))


@functools.lru_cache(maxsize=1)
def _worker_model(name: str):
    """The model of a worker process, loaded by its first task and kept for the next
    (Ray reuses workers: a Wan checkpoint loads once per worker, not once per unit)."""
    from ffviz.models import load_model
    return load_model(name)


def run_unit_task(model, config: EvalConfig, prompt: str, seed: int, skip: frozenset, threads: int):
    """A Ray task (a generator: each row is streamed back as soon as it is measured)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    if isinstance(model, str):
        model = _worker_model(model)
    yield from evaluate_unit(model, config, prompt, seed, skip)


def _settings_for_workers(address: str | None) -> dict | None:
    """The runtime env that carries this process's FFVIZ_* settings (e.g. FFVIZ_WAN_BASE)
    to the workers of a cluster joined from here. None for a local Ray (its workers
    inherit them) and in a Ray job (the job passes its own: Ray refuses a variable
    given twice)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FFVIZ_")}
    if address is None or not env or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return None
    return {"env_vars": env}


class RayBackend:
    """Units as Ray tasks, as many at once as the cluster's resources allow: each task
    asks for ``threads`` CPUs (at least 1) and ``gpus_per_task(model)`` GPUs.

    ``model``: a name, loaded by each worker (``models.load_model``), or a loaded model,
    shipped through Ray's object store. ``address``: None starts a local Ray (with
    ``num_cpus`` CPUs, default all), else the cluster to join ("auto", "HOST:PORT").
    When Ray is already initialised (a caller's own ``ray.init``), that is used, and
    left running. Ray's own retries are off: the sweep retries.
    """
    name = "ray"

    def __init__(self, model, config: EvalConfig, threads: int = 1, address: str | None = None,
                 num_cpus: int | None = None):
        import ray
        self.ray, self.config, self.threads = ray, config, threads
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            try:
                # "local": a new Ray, even where `ray start` left one running on this machine
                ray.init(address=address or "local", num_cpus=num_cpus if address is None else None,
                         include_dashboard=False, logging_level="WARNING",
                         runtime_env=_settings_for_workers(address))
            except ConnectionError as e:
                raise EvalError(f"could not join the Ray cluster at {address!r}: {e}") from None
        self.task = ray.remote(run_unit_task).options(
            num_cpus=max(threads, 1), num_gpus=gpus_per_task(model), max_retries=0)
        self.model = model if isinstance(model, str) else ray.put(model)
        self.pending: dict = {}  # ObjectRefGenerator -> Unit

    def submit(self, unit: Unit, skip: set[str]) -> None:
        handle = self.task.remote(self.model, self.config, unit.prompt, unit.seed,
                                  frozenset(skip), self.threads)
        self.pending[handle] = unit

    def events(self) -> Iterator[RunFinished | UnitFailed]:
        ray = self.ray
        while self.pending:
            # a task's generator is ready when its next row is (or when it has ended)
            [handle], _ = ray.wait(list(self.pending), num_returns=1)
            unit = self.pending.pop(handle)
            try:
                row = ray.get(next(handle))
            except StopIteration:
                continue
            except Exception as e:  # the task raised, or its worker or node died
                yield UnitFailed(unit, e)
                continue
            self.pending[handle] = unit
            yield RunFinished(unit, row)

    def close(self) -> None:
        for handle in self.pending:  # left by an error: their rows would go nowhere
            self.ray.cancel(handle)
        self.pending.clear()
        if self.owns_ray:
            self.ray.shutdown()

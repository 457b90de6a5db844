"""A sweep's finished runs on disk, so that a killed sweep resumes where it was.

One JSON file per unit of the grid (one prompt and seed) under ``DIR/runs/``, named
by a hash of the settings its rows depend on (model and its weights, frames, horizon, query steps,
prompt, seed): a rerun with other settings starts fresh files beside the old ones
instead of mixing rows. Inside, ``rows`` holds the finished runs by ``run_key`` and
``failed`` the runs whose task failed twice (retried by the next rerun). The file is
rewritten, through a temporary file and a rename, after every run: a killed sweep
loses at most the runs in flight, and never leaves half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ffviz.evaluate import run_key


class UnitStore:
    """The stored runs of the units of one sweep's settings (``settings``: what every
    row depends on besides its prompt and seed)."""

    def __init__(self, folder: Path, settings: dict, log=None):
        self.folder, self.settings, self.log = Path(folder), settings, log
        self._units: dict[tuple[str, int], dict] = {}

    def _identity(self, prompt: str, seed: int) -> dict:
        return {**self.settings, "prompt": prompt, "seed": seed}

    def path(self, prompt: str, seed: int) -> Path:
        identity = json.dumps(self._identity(prompt, seed), sort_keys=True)
        return self.folder / f"seed{seed}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"

    def unit(self, prompt: str, seed: int) -> dict:
        key = (prompt, seed)
        if key not in self._units:
            self._units[key] = self._read(prompt, seed)
        return self._units[key]

    def _read(self, prompt: str, seed: int) -> dict:
        identity = self._identity(prompt, seed)
        path = self.path(prompt, seed)
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if {k: stored.get(k) for k in identity} != identity:
                    raise ValueError("its settings differ")
                return {**identity, "rows": dict(stored["rows"]), "failed": dict(stored["failed"])}
            except (ValueError, KeyError, TypeError) as e:  # edited by hand, or another format
                if self.log:
                    self.log(f"{path} unreadable ({e}): its runs are redone")
        return {**identity, "rows": {}, "failed": {}}

    def done(self, prompt: str, seed: int) -> set[str]:
        """``run_key``s of the unit's finished runs."""
        return set(self.unit(prompt, seed)["rows"])

    def add(self, prompt: str, seed: int, row: dict) -> None:
        """A finished run (a row, possibly with the policy's own ``error``)."""
        unit = self.unit(prompt, seed)
        unit["rows"][run_key(row)] = row
        unit["failed"].pop(run_key(row), None)
        self._write(unit)

    def fail(self, prompt: str, seed: int, rows: list[dict]) -> None:
        """Runs whose task failed for good (``evaluate.error_row``s)."""
        unit = self.unit(prompt, seed)
        unit["failed"].update({run_key(r): r for r in rows})
        self._write(unit)

    def row(self, prompt: str, seed: int, run: dict) -> dict | None:
        """The stored row of ``run`` (a ``grid_runs`` entry): finished, failed, or None."""
        unit = self.unit(prompt, seed)
        key = run_key(run)
        return unit["rows"].get(key) or unit["failed"].get(key)

    def _write(self, unit: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(unit["prompt"], unit["seed"])
        # NaN and inf stay numbers (Python's JSON reads them back), numpy scalars plain
        text = json.dumps(unit, indent=1, default=lambda x: x.item())
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".unit-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

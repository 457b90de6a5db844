"""Named scenario suites for ``ffviz eval`` and ``ffviz ablate``, and which seeds are for what.

A suite is a list of prompts, the seeds it is run on unless told otherwise, and a
run length. The memory suites are scenes where the cache decides: small objects
leave the view (hidden 8-19 frames) or pass behind a wide pillar (4-10 frames), so
every hidden span outlasts a 3-frame window, and each run of 48 frames has at least
one such return for every prompt and default seed (``tests/test_suites.py``). In
``memory-unnamed`` the prompts name no colour: the condition leaves the colours out,
so what a returning object looks like is in the cache alone.

Held out, or for tuning. Anything that is tuned (a policy's defaults, ``ffviz
ablate``) uses ``memory-tuning`` and seeds below ``HELD_OUT_SEED_BASE``; reported
results use ``memory``, whose prompts are not in the tuning suite, and seeds from
``HELD_OUT_SEED_BASE`` up. Training draws its scenes from seeds >= 2**20
(``sampling.TRAIN_SEED_BASE``), above both.
"""
from __future__ import annotations

import dataclasses

HELD_OUT_SEED_BASE = 1000  # seeds 0..999 are for tuning, 1000..2**20-1 are held out


@dataclasses.dataclass(frozen=True)
class Suite:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    frames: int
    about: str


SUITES: dict[str, Suite] = {
    "memory": Suite(
        prompts=(
            "a small red circle and a small yellow square on a blue background with a wide gray "
            "pillar, leaving the view",
            "a small white triangle and a small green circle on a black background with a wide "
            "purple pillar",
            "a small cyan square and a small purple triangle on a white background, leaving the view",
        ),
        seeds=tuple(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + 16)), frames=48,
        about="held out: exits and wide pillars that outlast a small window; report on it"),
    "memory-unnamed": Suite(
        prompts=(
            "a small circle and a small square on a blue background with a wide gray pillar, "
            "leaving the view",
            "a small triangle and a small circle on a black background with a wide purple pillar",
            "a small square and a small triangle on a white background, leaving the view",
        ),
        seeds=tuple(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + 16)), frames=48,
        about="held out: the memory suite's scenes with colours the prompt does not name (drawn "
              "per seed, left out of the condition): a returning object's colour is in the cache "
              "alone"),
    "memory-tuning": Suite(
        prompts=(
            "a small yellow circle, a small purple square and a small green triangle on a black "
            "background with a wide white pillar, leaving the view",
            "a small blue circle and a small white square on a green background, leaving the view",
            "a small red square and a small cyan circle on a black background with a wide yellow pillar",
        ),
        seeds=tuple(range(16)), frames=48,
        about="for tuning (ffviz ablate): the memory suite's kind of scene, other prompts and seeds"),
    "exits": Suite(
        prompts=(
            "a red circle and a blue square on a green background with a gray pillar, fast",
            "a small white circle, a cyan square and an orange triangle on a black background, fast",
            "two pink squares and a yellow circle on a blue background with a brown pillar",
        ),
        seeds=(0, 1), frames=96,
        about="the first suite: objects leave the view and come back, narrow pillars"),
}
DEFAULT_SUITE_NAME = "memory"


def held_out_parts(config) -> str:
    """What of an eval config (``seeds``, ``prompts``) is held out, in words ("" if nothing)."""
    parts = []
    seeds = [s for s in config.seeds if s >= HELD_OUT_SEED_BASE]
    if seeds:
        parts.append(f"seeds ({len(seeds)} of them >= {HELD_OUT_SEED_BASE})")
    for name in ("memory", "memory-unnamed"):
        if set(config.prompts) & set(SUITES[name].prompts):
            parts.append(f"prompts (the {name} suite's)")
    return " and ".join(parts)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        from ffviz.evaluate import EvalError
        raise EvalError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}")
    return SUITES[name]

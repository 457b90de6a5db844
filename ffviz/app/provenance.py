"""Which run a result came from: every run the app starts gets a ``RunTag`` (id,
policy, budget, start time), and every result it shows or exports carries its text,
so a plot, an oracle or an A/B table left on screen still says where it came from.
Also the few words the app uses for budgets and frame counts, said one way everywhere."""
from __future__ import annotations

import dataclasses
import itertools
import time

from ffviz.policies import POLICIES

_counter = itertools.count(1)


def plural(n: int, word: str) -> str:
    """"1 frame", "4 frames", "2 switches"."""
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith(("s", "sh", "ch")) else "s")


def holds_budget(policy: str) -> bool:
    """False for the full cache, which keeps everything whatever the budget says."""
    return getattr(POLICIES.get(policy), "holds_budget", True)


def budget_text(policy: str, budget_frames: int) -> str:
    """A policy's budget as a user reads it: the full cache has none."""
    if not holds_budget(policy):
        return "no budget (full cache)"
    return plural(int(budget_frames), "frame")


@dataclasses.dataclass(frozen=True)
class RunTag:
    """``run_id`` is unique within the server process (r1, r2, ...); ``kind``: "run",
    "A/B" or "memory test"."""
    run_id: str
    policy: str
    budget: str  # as ``budget_text`` says it
    started: str  # HH:MM:SS, server time
    kind: str = "run"

    @classmethod
    def new(cls, policy, budget_frames: int, kind: str = "run") -> "RunTag":
        return cls(f"r{next(_counter)}", policy.name, budget_text(policy.name, budget_frames),
                   time.strftime("%H:%M:%S"), kind)

    def text(self) -> str:
        return f"{self.kind} {self.run_id} · {self.policy} · {self.budget} · {self.started}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

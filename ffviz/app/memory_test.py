"""The memory test: one scene where objects leave the view and come back, run with
the full cache, a window and Future Forcing on the same seed and budget, side by
side, to see which policy brings a returning object back.

How long it runs is decided by the scene's own truth (``hide_events``), never by
the model: until every object that leaves has come back and been watched for
``RETURN_WINDOW`` frames. What "brought back" means is ``ffviz.metrics``' rule
for ``returns`` (its colour shows again within that window).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ffviz.app.provenance import plural
from ffviz.app.quality import curves, hide_events
from ffviz.app.session import RunSession, check_inputs, interleave
from ffviz.app.views import write_json
from ffviz.metrics import RETURN_WINDOW
from ffviz.policies import POLICIES, make_policy
from ffviz.scenes import EXAMPLE_PROMPTS, parse_prompt

# an example whose objects leave the view and return (the scene grammar's "leaving the view")
MEMORY_PROMPT = next(p for p in EXAMPLE_PROMPTS if "leaving the view" in p)
MEMORY_POLICIES = tuple(p for p in ("full", "window", "future_forcing") if p in POLICIES)
MIN_FRAMES = 32


def memory_test_frames(spec, seed: int, given: int, max_frames: int) -> int:
    """Frames until each object's first return has been watched ``RETURN_WINDOW``
    frames (objects that never leave within ``max_frames`` do not count)."""
    first_back = {}
    for e in hide_events(spec, seed, max_frames):
        if e["back"] < max_frames:
            first_back.setdefault(e["object"], e["back"])
    need = max(first_back.values(), default=MIN_FRAMES) + RETURN_WINDOW + 2
    return int(min(max(need, MIN_FRAMES, given + 3), max_frames))


class MemoryTest:
    """Three runs (``MEMORY_POLICIES``) of ``MEMORY_PROMPT``: build, iterate ``run()``."""

    def __init__(self, template, seed, budget, max_frames: int, snap: bool | None = None,
                 one_motion: bool | None = None):
        spec, _ = parse_prompt(MEMORY_PROMPT, int(seed))
        frames = memory_test_frames(spec, int(seed), template.cfg.given_frames, max_frames)
        self.settings = check_inputs(MEMORY_PROMPT, frames, budget, seed, max_frames, True, snap,
                                     one_motion)
        self.budget = int(budget)
        self.sessions = [RunSession(template, self.settings, make_policy(p), self.budget,
                                    keep_oracle_keys=False, kind="memory test")
                         for p in MEMORY_POLICIES]
        self.hides = hide_events(spec, self.settings.seed, frames)

    def run(self) -> Iterator[None]:
        return interleave(self.sessions)

    def stop(self) -> None:
        for s in self.sessions:
            s.stop()

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    @property
    def newest(self) -> int:
        """The newest frame all three runs have (-1: none yet)."""
        return min(len(s.frames) for s in self.sessions) - 1

    def banner(self) -> str:
        """What the scene does at the newest frame: who is hidden, who just came back."""
        t = self.newest
        hidden = [h for h in self.hides if h["left"] <= t < h["back"]]
        back = [h for h in self.hides if h["back"] <= t < h["back"] + RETURN_WINDOW]
        parts = [f"{h['name']} hidden since frame {h['left']}" for h in hidden]
        parts += [f"{h['name']} came back at frame {h['back']}: is it there?" for h in back]
        return f"frame {t}: " + ("; ".join(parts) if parts else "all objects in view")

    def runs(self) -> list[dict]:
        return [c for c in (curves(s) for s in self.sessions) if c]

    def verdict(self) -> str:
        """A table: for each return in the run, whether each policy brought it back."""
        events = {}
        for s in self.sessions:
            c = curves(s)
            for e in (c["returns"] if c else []):
                events.setdefault((e["name"], e["left"], e["back"]), {})[c["policy"]] = e["recovered"]
        if not events:
            return "no object came back within the frames generated so far"
        head = "| object | hidden | " + " | ".join(s.tag.policy for s in self.sessions) + " |"
        rows = [head, "|" + " --- |" * (2 + len(self.sessions))]
        for (name, left, back), got in sorted(events.items(), key=lambda kv: kv[0][2]):
            marks = [("back" if got[s.tag.policy] else "**lost**") if s.tag.policy in got else "-"
                     for s in self.sessions]
            rows.append(f"| {name} | frames {left}-{back - 1} | " + " | ".join(marks) + " |")
        return "\n".join(rows) + (f"\n\n*back*: its colour shows again within {RETURN_WINDOW} "
                                  "frames of its return (the scene's truth says when)")

    def status(self) -> str:
        state = ("running" if any(s.running for s in self.sessions) else
                 "stopped" if self.newest + 1 < self.settings.frames else "done")
        return (f"**memory test {state}** - frame {self.newest + 1}/{self.settings.frames} - "
                f"seed {self.settings.seed}, budget {plural(self.budget, 'frame')} - " +
                ", ".join(f"`{s.tag.policy}` ({s.tag.run_id})" for s in self.sessions))

    def export(self, path: Path) -> str:
        """memory_test.json: the runs' tags, summaries and curves, and the scene's hides."""
        data = {"prompt": MEMORY_PROMPT, "seed": self.settings.seed, "budget_frames": self.budget,
                "hides": self.hides,
                "runs": [{"tag": s.tag.as_dict(), "summary": s.summary, "curves": curves(s)}
                         for s in self.sessions]}
        return write_json(path, data)

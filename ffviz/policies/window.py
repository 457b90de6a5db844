"""Sliding window: keep the newest ``budget`` frames (Self-Forcing's rolling cache)."""
from __future__ import annotations

import dataclasses

from ffviz.policies.base import Policy, keep_newest


@dataclasses.dataclass
class Window(Policy):
    name = "window"

    def compress(self, cache, budget_tokens, ctx):
        if cache.size <= budget_tokens:
            return None
        return keep_newest(cache, budget_tokens)

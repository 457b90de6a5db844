"""Full cache: keep everything (the reference every other policy is compared to)."""
from __future__ import annotations

import dataclasses

from ffviz.policies.base import Policy


@dataclasses.dataclass
class Full(Policy):
    """No parameters: the cache grows without bound."""
    name = "full"
    holds_budget = False

    def compress(self, cache, budget_tokens, ctx):
        return None

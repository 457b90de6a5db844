"""One palette for every view: a colour means the same thing everywhere."""
KEPT = "#1b9e77"     # token stays in the cache
MERGED = "#d95f02"   # token merged into a kept one
DROPPED = "#9e9e9e"  # token evicted
PRE = "#1f77b4"      # pre-RoPE queries
POST = "#d62728"     # post-RoPE queries
SWITCH = "#7b3294"   # a live policy / budget switch

STATE_COLORS = {"kept": KEPT, "merged": MERGED, "dropped": DROPPED}


def rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))

# one colour per policy wherever runs are compared (A/B, the memory test, quality plots)
POLICY_COLORS = {"full": "#333333", "window": "#1f77b4", "future_forcing": "#d62728",
                 "sink": "#9467bd", "h2o": "#8c564b", "snapkv": "#e377c2",
                 "expected_attention": "#ff7f0e", "deep_forcing": "#17becf"}
_SPARE = ("#bcbd22", "#7f7f7f", "#2ca02c", "#aec7e8")


def policy_color(name: str) -> str:
    return POLICY_COLORS.get(name) or _SPARE[sum(map(ord, name)) % len(_SPARE)]

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

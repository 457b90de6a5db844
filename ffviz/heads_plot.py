"""heads.png: a layer x head heatmap per measure of a heads.json (``ffviz.heads``).

The first panel is Forcing-KV's score with each head's role (S static, D dynamic)
and how often its samples agree with it; the others are the score's spread and
where the attention goes (entropy, sink, the chunk and the frame before it, older
frames).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PANELS = (("score", "Forcing-KV score (S/D: role, % samples agreeing)", "viridis"),
          ("score_std", "score std over prompts x seeds x steps", "magma"),
          ("entropy", "attention entropy (normalised)", "cividis"),
          ("sink_share", "share on the sink", "Blues"),
          ("near_share", "share on the chunk + the frame before", "Greens"),
          ("older_share", "share on older frames (memory)", "Oranges"))


def plot_heads(result: dict, path: Path) -> None:
    """Write the heatmaps of ``result`` (heads.json's content) to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ffviz.heads import head_matrices
    m = head_matrices(result)
    m["near_share"] = m["chunk_share"] + m["recent_share"]
    L, H = m["score"].shape
    fig, axes = plt.subplots(2, 3, figsize=(4 + 2.2 * H, 2 + 1.4 * L), squeeze=False)
    for ax, (name, title, cmap) in zip(axes.flat, PANELS):
        vmax = 1.0 if name != "score_std" else max(float(np.nanmax(m[name])), 1e-6)
        im = ax.imshow(m[name], cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax, fraction=0.046)
        if name == "score":
            for l in range(L):
                for h in range(H):
                    agree = m["role_agreement"][l, h]
                    label = "S" if m["static"][l, h] else "D"
                    if np.isfinite(agree):
                        label += f"\n{100 * agree:.0f}%"
                    ax.text(h, l, label, ha="center", va="center", fontsize=7, color="white")
    s = result["summary"]
    fig.suptitle(f"{result['model']}: {s['static_heads']} of {L * H} heads static "
                 f"(threshold {result['threshold']}), score std {s['score_std_mean']} on average; "
                 f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds x "
                 f"{result['steps']} steps, {result['frames']} frames", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

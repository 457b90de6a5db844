"""How a recall model (TinyConfig.recall) chooses recall, from true frames.

    python tools/recall_probe.py runs/recall/tiny.safetensors [--raw] [--batches 6]

Draws training-like clips of 24 frames (never the training batches: seed 5, steps from
900,000), runs the model on them as training does (true frames cached, each target at the
last denoising step's noise level 0.5), and counts over the target patches:

* taught: patches where recall gives the true patch (error under RECALL_GIVES) and no
  displacement of the previous frame does (an object coming out from behind the pillar);
* picked where taught: the share of those where the model's choice is recall;
* wrong picks: patches where the model picks recall and recall is off (error > 1e-3),
  per kind of scene (exits, pillar, plain; a scene with both counts in both);
* with ``recall_lag_pick``, the patches where recall's reads disagree and some read gives
  the patch (``lag_pick_telling``) and the share of those where the pick's own first
  choice gives it (``lag_pick_right_share``).

``--raw``: the run's raw optimizer weights (its ``.state.pt``) instead of the EMA.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.train import TrainConfig, draw, motion_targets, state_path_for, true_slots  # noqa: E402
from ffviz.weights import load_tiny  # noqa: E402


def probe(model, batches: int = 6, batch: int = 8, level: float = 0.5) -> dict:
    if not model.cfg.recall:
        raise ValueError("these weights have no recall (TinyConfig.recall)")
    model.eval()
    cfg = TrainConfig(batch=batch, curriculum=((0, 24),), targets=12)
    n = model.cfg.tokens_per_frame
    K = model.displacement_length.numel()
    counts = {"patches": 0, "taught": 0, "picked_where_taught": 0, "wrong_picks": 0}
    lag_pick = {"lag_pick_telling": 0, "lag_pick_right": 0}
    kinds = {k: {"wrong_picks": 0, "taught": 0, "picked_where_taught": 0} for k in ("exits", "pillar", "plain")}
    for step in range(900_000, 900_000 + batches):
        b = draw(5, step, cfg, model.cfg)
        s = true_slots(model, b)
        T, targets = len(b.frame_idx), len(b.targets)
        noise = torch.randn(s.target.shape, generator=torch.Generator().manual_seed(step))
        x = torch.cat([s.truth, (1 - level) * s.target + level * noise], 1)
        t = torch.cat([torch.zeros(batch, T), torch.full((batch, targets), level)], 1)
        index = motion_targets(model, s.target_prev, s.target, model.split_condition(s.cond)[3])[0]
        centre = torch.full((batch, T * n), K // 2, dtype=torch.long)
        with torch.no_grad():
            _, logits = model(x, t, s.frames, s.cond, prev=torch.cat([s.prev, s.target_prev], 1),
                              mask=s.mask, motion_index=torch.cat([centre, index], 1),
                              return_motion_logits=True, recall_target=torch.cat([s.truth, s.target], 1))
        taught = model.recall_used[:, T * n:]
        picked = logits[:, T * n:].argmax(-1) == K
        wrong = picked & ((model.recall_pixels[:, T * n:] - s.target).pow(2).mean(-1) > 1e-3)
        counts["patches"] += taught.numel()
        counts["taught"] += int(taught.sum())
        counts["picked_where_taught"] += int((picked & taught).sum())
        counts["wrong_picks"] += int(wrong.sum())
        if model.cfg.recall_lag_pick:
            telling = model.lag_pick_telling[:, T * n:]
            own = model.lag_pick_logits[:, T * n:].argmax(-1, keepdim=True)
            right = model.lag_pick_gives[:, T * n:].gather(-1, own)[..., 0]
            lag_pick["lag_pick_telling"] += int(telling.sum())
            lag_pick["lag_pick_right"] += int((right & telling).sum())
        exits = torch.tensor([sc.spec.exits for sc in b.scenes])[:, None].expand_as(taught)
        pillar = torch.tensor([bool(sc.spec.pillar) for sc in b.scenes])[:, None].expand_as(taught)
        for name, where in (("exits", exits), ("pillar", pillar), ("plain", ~exits & ~pillar)):
            kinds[name]["wrong_picks"] += int((wrong & where).sum())
            kinds[name]["taught"] += int((taught & where).sum())
            kinds[name]["picked_where_taught"] += int((picked & taught & where).sum())
    return {**counts, "taught_share": counts["taught"] / counts["patches"],
            "picked_where_taught_share": counts["picked_where_taught"] / max(counts["taught"], 1),
            "wrong_pick_share": counts["wrong_picks"] / counts["patches"], "by_scene": kinds,
            **({**lag_pick, "lag_pick_right_share": lag_pick["lag_pick_right"] / max(lag_pick["lag_pick_telling"], 1)}
               if model.cfg.recall_lag_pick else {})}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--raw", action="store_true", help="the run's raw weights (its .state.pt), not the EMA")
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args(argv)
    model, _ = load_tiny(args.weights)
    if args.raw:
        model.load_state_dict(torch.load(state_path_for(args.weights), map_location="cpu",
                                         weights_only=False)["model"])
    try:
        result = probe(model, args.batches)
    except ValueError as e:
        raise SystemExit(f"{args.weights}: {e}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

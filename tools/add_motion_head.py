"""Give trained change-head weights a motion head, keeping everything they learnt.

    python tools/add_motion_head.py assets/tiny.safetensors --reach 2 --out runs/m/tiny.safetensors

The new model is the old one plus ``TinyConfig.motion_reach``: per patch, weights over
the previous frame's displacements, starting at 94% on none, so it starts as nearly the
model it was. The card keeps the steps and history, so ``python -m ffviz train --out``
goes on from there (with a fresh optimizer, which warms up again). Where the weights
have a training state beside them (``tiny.state.pt``), it is carried over instead: the
raw weights and the optimizer's moments of every part they had, so training resumes
exactly, with only the new parts starting afresh.

``--per-pixel`` makes a picking head choose per pixel (``TinyConfig.motion_per_pixel``):
every pixel of a patch starts with its patch's choice (the head's rows repeated, the
optimizer's moments too), so the model starts as the one it was.

``--pixel-moves`` (on recall weights) lets each pixel of a patch whose pick is a world
move take another one (``TinyConfig.pixel_moves``); its correction starts at zero, so
the model starts as the one it was. ``--scene-torus`` (on recall weights) makes the
moves and recall follow each scene's own torus (``TinyConfig.scene_torus``), and
``--round-trip`` lets recall look a round trip back there (``recall_round_trip``): no new
parameters; scenes that stay in the view generate as before. ``--lag-pick`` (on recall
weights) gives recall's choice one lag's read per patch where a learnt pick prefers it
to the mean over lags (``TinyConfig.recall_lag_pick``); it starts on the mean. The card
records each graft's new parameters: training's EMA of them warms up from the graft
(``ffviz.train.parameter_births``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffviz.models.tiny import TinyVideoModel  # noqa: E402
from ffviz.train import state_path_for  # noqa: E402
from ffviz.weights import load_tiny, save_weights, training_progress  # noqa: E402

NEW_PARTS = ("motion", "match_embed", "memory_scale", "motion_refine", "position_embed", "recall_trust",
             "recall_choice", "pixel_moves", "recall_lag_pick")


def grown(old_model, cfg, state_dict):
    """A model of ``cfg`` holding ``state_dict`` of ``old_model``'s parts (the new ones
    as initialised; the memory head's share of layer 0's output at zero when new)."""
    model = TinyVideoModel(cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    new_block = f"blocks.{old_model.cfg.layers}." if cfg.layers > old_model.cfg.layers else None
    assert not unexpected and all(k.split(".")[0] in NEW_PARTS or (new_block and k.startswith(new_block))
                                  for k in missing), (missing, unexpected)
    if new_block:  # the recall block starts as no block at all: nothing it computes enters the stream
        with torch.no_grad():
            for part in (model.blocks[-1].attn.out, model.blocks[-1].mlp[2]):
                part.weight.zero_()
                part.bias.zero_()
    if cfg.motion_memory and not old_model.cfg.motion_memory:  # its values must not enter the stream
        with torch.no_grad():
            model.blocks[0].attn.out.weight[:, :cfg.head_dim] = 0.0
    return model


def per_pixel_rows(state_dict: dict, pixels: int) -> dict:
    """``state_dict`` with the motion head's rows repeated for each of ``pixels`` pixels
    (row p * K + k: pixel p, displacement k), so each pixel starts with its patch's choice."""
    return {k: v.repeat(pixels, *([1] * (v.dim() - 1))) if k in ("motion.weight", "motion.bias") else v
            for k, v in state_dict.items()}


def carried_state(old_model, raw, state: dict) -> dict:
    """The training state for ``raw`` (the old raw weights, grown): its weights and the old
    optimizer state with each parameter's moments moved to its index in ``raw`` (a
    motion head made per pixel: its moments repeated as its rows are)."""
    old_names = [name for name, _ in old_model.named_parameters()]
    new_index = {name: i for i, (name, _) in enumerate(raw.named_parameters())}
    shapes = [p.shape for p in raw.parameters()]
    opt = state["opt"]

    def fitted(moment: dict, shape) -> dict:
        return {k: v.repeat(shape[0] // v.shape[0], *([1] * (v.dim() - 1)))
                if torch.is_tensor(v) and v.dim() and v.shape != shape else v for k, v in moment.items()}
    moments = {new_index[old_names[i]]: fitted(v, shapes[new_index[old_names[i]]])
               for i, v in opt["state"].items()}
    groups = [{**opt["param_groups"][0], "params": list(range(len(new_index)))}]
    return {"model": raw.state_dict(), "opt": {"state": moments, "param_groups": groups},
            "step": state["step"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--reach", type=int, default=2)
    p.add_argument("--pick", action="store_true",
                   help="one displacement per patch (TinyConfig.motion_pick) instead of the blend")
    p.add_argument("--memory", action="store_true",
                   help="head 0 of layer 0 becomes the motion memory (TinyConfig.motion_memory); "
                        "its part of the layer's output starts at zero")
    p.add_argument("--match", action="store_true",
                   help="each token also sees how well each displacement of its previous frame "
                        "explains it (TinyConfig.motion_match)")
    p.add_argument("--refine", action="store_true",
                   help="an MLP over the head's features and the memory's read corrects the "
                        "motion choice (TinyConfig.motion_refine; needs the memory)")
    p.add_argument("--position", action="store_true",
                   help="each patch learns where in the frame it is (TinyConfig.patch_position), "
                        "so tokens can know the view's edge (bounces)")
    p.add_argument("--recall", action="store_true",
                   help="one more block, whose first heads recall each patch from the frames the "
                        "scene's motion carried it from (TinyConfig.recall); it starts adding nothing")
    p.add_argument("--pixel-moves", action="store_true",
                   help="each pixel of a patch whose pick is a world move may take another world move "
                        "(TinyConfig.pixel_moves; needs recall); it starts changing nothing")
    p.add_argument("--scene-torus", action="store_true",
                   help="in scenes whose objects leave the view, moves do not wrap sideways and recall "
                        "looks along the scene's longer torus (TinyConfig.scene_torus; needs recall)")
    p.add_argument("--round-trip", action="store_true",
                   help="with the scene's torus, recall in scenes that leave the view also looks a "
                        "round trip back, 28-44 frames (TinyConfig.recall_round_trip)")
    p.add_argument("--lag-pick", action="store_true",
                   help="recall gives one lag's read per patch where a learnt pick prefers it to the "
                        "mean over lags (TinyConfig.recall_lag_pick; needs recall); it starts on the mean")
    p.add_argument("--per-pixel", action="store_true",
                   help="a picking head chooses per pixel, not per patch (TinyConfig.motion_per_pixel)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    old, card = load_tiny(args.weights)
    cfg = old.cfg
    if cfg.motion_reach and (cfg.motion_reach != args.reach or (cfg.motion_pick and not args.pick)):
        raise SystemExit(f"{args.weights} has a motion head already (reach {cfg.motion_reach}, "
                         f"pick {cfg.motion_pick}): only --pick, --match, --memory, --refine "
                         "and --position can be added to it")
    memory = args.memory or cfg.motion_memory
    if args.refine and not memory:
        raise SystemExit("--refine corrects what the motion memory reads: add --memory too")
    if args.pixel_moves and not (args.recall or cfg.recall):
        raise SystemExit("--pixel-moves picks among still, the scene's motion and recall: add --recall too")
    if args.scene_torus and not (args.recall or cfg.recall):
        raise SystemExit("--scene-torus follows the scene's torus with the moves and recall: add --recall too")
    if args.round_trip and not (args.scene_torus or cfg.scene_torus):
        raise SystemExit("--round-trip looks back along the scene's torus: add --scene-torus too")
    if args.lag_pick and not (args.recall or cfg.recall):
        raise SystemExit("--lag-pick picks among recall's reads: add --recall too")
    if args.per_pixel and not (args.pick or cfg.motion_pick):
        raise SystemExit("--per-pixel makes the pick per pixel: add --pick too")
    new_cfg = dataclasses.replace(cfg, motion_reach=args.reach, motion_pick=args.pick or cfg.motion_pick,
                                  motion_per_pixel=args.per_pixel or cfg.motion_per_pixel,
                                  motion_match=args.match or cfg.motion_match, motion_memory=memory,
                                  motion_refine=args.refine or cfg.motion_refine,
                                  patch_position=args.position or cfg.patch_position,
                                  recall=args.recall or cfg.recall,
                                  pixel_moves=args.pixel_moves or cfg.pixel_moves,
                                  scene_torus=args.scene_torus or cfg.scene_torus,
                                  recall_round_trip=args.round_trip or cfg.recall_round_trip,
                                  recall_lag_pick=args.lag_pick or cfg.recall_lag_pick,
                                  layers=cfg.layers + int(args.recall and not cfg.recall))
    pixels = cfg.patch ** 2
    adapted = (lambda sd: per_pixel_rows(sd, pixels)) if new_cfg.motion_per_pixel and not cfg.motion_per_pixel \
        else (lambda sd: sd)
    try:
        model = grown(old, new_cfg, adapted(old.state_dict()))
    except ValueError as e:
        raise SystemExit(f"{args.weights}: {e}")
    keep = training_progress(card)
    state_in = state_path_for(args.weights)
    if state_in.exists():
        state = torch.load(state_in, map_location="cpu", weights_only=False)
        if state.get("step") != keep.get("steps"):
            raise SystemExit(f"{state_in} is at step {state.get('step')}, {args.weights} at "
                             f"{keep.get('steps')}: they are not one checkpoint")
        raw_old = TinyVideoModel(cfg)
        raw_old.load_state_dict(state["model"])
        raw = grown(raw_old, new_cfg, adapted(state["model"]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(carried_state(raw_old, raw, state), state_path_for(args.out))
    elif state_path_for(args.out).exists():  # another run's state: it must not resume these weights
        state_path_for(args.out).unlink()
    added = [name for name, on in (("pick", args.pick), ("per-pixel", args.per_pixel), ("match", args.match),
                                   ("memory", args.memory), ("refine", args.refine),
                                   ("position", args.position), ("recall", args.recall),
                                   ("pixel-moves", args.pixel_moves), ("scene-torus", args.scene_torus),
                                   ("round-trip", args.round_trip), ("lag-pick", args.lag_pick)) if on]
    born = [name for name, _ in model.named_parameters() if name not in old.state_dict()]
    # the new parameters, so that training's EMA warms up from here for them
    keep["grafts"] = keep.get("grafts", []) + [{"step": keep.get("steps", 0), "added": added,
                                                 "parameters": born}]
    save_weights(model.eval(), args.out, keep)
    print(f"wrote {args.out}: motion reach {args.reach}, pick {args.pick}, match "
          f"{new_cfg.motion_match}, memory {new_cfg.motion_memory}, refine {new_cfg.motion_refine}, "
          f"position {new_cfg.patch_position}, per pixel {new_cfg.motion_per_pixel}, recall {new_cfg.recall}, "
          f"pixel moves {new_cfg.pixel_moves}, scene torus {new_cfg.scene_torus} "
          f"(round trip {new_cfg.recall_round_trip}, lag pick {new_cfg.recall_lag_pick}) "
          f"on {args.weights} (step {keep.get('steps')})"
          + (", its training state carried over" if state_in.exists() else ""))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

"""Saving and loading the embedded model's weights with their card.

The card (JSON next to the safetensors file) holds the config, training
progress, the data version, the sha256 of the weights file and the command
that made them. Loading checks the hash: a missing, truncated or altered file
is a clear ``WeightsError``, never a silently different model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ffviz.models import ModelError
from ffviz.models.tiny import TinyConfig, TinyVideoModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "tiny.safetensors"


class WeightsError(ModelError):
    """Weights that are missing, corrupt, or do not fit the model."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_weights(model: TinyVideoModel, path: Path, card: dict) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves half a file under the real name
    card = {**card, "config": dataclasses.asdict(model.cfg), "file": path.name,
            "sha256": sha256(path), "bytes": path.stat().st_size}
    card_path(path).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def training_progress(card: dict) -> dict:
    """What of a card a training run goes on from (steps, clips seen, seconds, data
    version, history): to carry over when weights are changed outside training."""
    return {k: card[k] for k in ("steps", "clips_seen", "train_seconds", "data_version",
                                 "world_changes", "grafts", "history") if k in card}


def read_card(path: Path = DEFAULT_WEIGHTS) -> dict:
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights not found: {path}. The embedded model ships in assets/; "
                           "restore it with `git checkout -- assets/` or train one with "
                           "`python -m ffviz train`")
    cp = card_path(path)
    if not cp.exists():
        raise WeightsError(f"weights card not found: {cp} (it records the sha256 the weights are checked against)")
    try:
        return json.loads(cp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"weights card {cp} is not valid JSON: {e}") from None


def load_tiny(path: Path = DEFAULT_WEIGHTS, check_hash: bool = True) -> tuple[TinyVideoModel, dict]:
    """The embedded model in eval mode, and its card."""
    path = Path(path)
    card = read_card(path)
    if check_hash:
        got = sha256(path)
        if got != card.get("sha256"):
            raise WeightsError(f"weights file {path} is corrupt or altered: sha256 {got[:12]}... "
                               f"does not match its card ({str(card.get('sha256'))[:12]}...)")
    known = {f.name for f in dataclasses.fields(TinyConfig)}
    cfg = TinyConfig(**{k: v for k, v in card["config"].items() if k in known})
    model = TinyVideoModel(cfg)
    try:
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # safetensors raises its own error types
        raise WeightsError(f"cannot read weights {path}: {e}") from None
    if missing or unexpected:
        raise WeightsError(f"weights {path} do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval(), card

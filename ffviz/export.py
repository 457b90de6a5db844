"""Writing a run's files: video.mp4, frames.npz, record.npz, decisions.jsonl,
summary.json. Used by the CLI and the app; frames stream to disk chunk by
chunk, so a long run does not hold its video in memory twice."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from ffviz.generate import Step

VIDEO_SIDE = 256  # small frames are upscaled (nearest) to about this side so they are watchable
VIDEO_FPS = 8


FILES = ("video.mp4", "decisions.jsonl", "frames.npz", "record.npz", "summary.json")


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None: strict JSON (a bare NaN
    is not JSON, and JavaScript's JSON.parse rejects it)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class OutputError(ValueError):
    """An output folder that cannot be written (the message says why)."""


def check_output_dir(path) -> Path:
    """Fail before any work when ``path`` cannot become a folder of files: it is a file,
    lies under one, or its nearest existing folder takes no new file (a read-only
    filesystem, no permission). Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {p} exists and is not a folder")
    base = p
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"output {p} cannot be created: {base} is not a folder")
    try:  # os.access says yes to root everywhere; a real file says what the filesystem allows
        fd, probe = tempfile.mkstemp(dir=base, prefix=".ffviz-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output {p} cannot be written: {e.strerror or e} in {base}") from None
    return p


class RunWriter:
    def __init__(self, out_dir: Path, fps: int = VIDEO_FPS):
        self.dir = check_output_dir(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._video = imageio.get_writer(self.dir / "video.mp4", fps=fps, codec="libx264",
                                         quality=8, macro_block_size=1,
                                         ffmpeg_log_level="error")
        self._decisions = open(self.dir / "decisions.jsonl", "w")
        self._frames: list[np.ndarray] = []

    def add(self, step: Step) -> None:
        for frame in step.frames:
            scale = max(1, VIDEO_SIDE // max(frame.shape[:2]))  # 32x32 -> 8x; Wan's 480x832 -> 1x
            self._video.append_data(frame.repeat(scale, 0).repeat(scale, 1))
        self._frames.append(step.frames)
        if step.decision_log is not None:
            entry = {"step": step.index, "frames": step.frame_indices, "policy": step.policy,
                     "params": step.policy_params, "budget_frames": step.budget_frames,
                     "tokens_before": step.cache_tokens_peak, "tokens_after": step.cache_tokens,
                     **step.decision_log}
            self._decisions.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def frames(self) -> np.ndarray:
        return np.concatenate(self._frames) if self._frames else np.zeros((0, 32, 32, 3), np.uint8)

    def close(self, summary: dict, recorder=None) -> None:
        self._video.close()
        self._decisions.close()
        np.savez_compressed(self.dir / "frames.npz", frames=self.frames())
        if recorder is not None:
            recorder.to_npz(self.dir / "record.npz")
        else:
            np.savez_compressed(self.dir / "record.npz", frames=np.zeros(0, np.int64))
        (self.dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")

    def abort(self) -> None:
        """A run that failed: close and remove what was written, so no half-written run
        is left behind (the folder stays only if it holds other files)."""
        for closing in (self._video.close, self._decisions.close):
            try:
                closing()
            except Exception:  # a writer broken by the failure itself
                pass
        for name in FILES:
            (self.dir / name).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass

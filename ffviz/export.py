"""Writing a run's files: video.mp4, frames.npz, record.npz, decisions.jsonl,
summary.json. Used by the CLI and the app; frames stream to disk chunk by
chunk, so a long run does not hold its video in memory twice."""
from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from ffviz.generate import Step

VIDEO_SIDE = 256  # small frames are upscaled (nearest) to about this side so they are watchable
VIDEO_FPS = 8


class RunWriter:
    def __init__(self, out_dir: Path, fps: int = VIDEO_FPS):
        self.dir = Path(out_dir)
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
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

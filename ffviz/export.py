"""A run's frames and files: ``FrameSpool`` keeps every frame once, on disk;
``RunWriter`` writes video.mp4, frames.npz, record.npz, decisions.jsonl and
summary.json. Frames stream to disk chunk by chunk, so however long a run is, its
video is never held in memory (a full-length Wan run decodes to gigabytes)."""
from __future__ import annotations

import collections
import json
import os
import shlex
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from ffviz.generate import Step

VIDEO_SIDE = 256  # small frames are upscaled (nearest) to about this side so they are watchable
RING = 12  # newest frames kept in memory for live views (the app's filmstrip shows 12)


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


def reproduce_command(settings, policy, budget_frames: int, model_name: str, frames: int,
                      switches=()) -> str:
    """The ``python -m ffviz generate`` command that gives the same run: its first policy
    and budget, and ``frames`` (a run stopped early: the frames it made; generation is
    causal, so they are the same). Live switches cannot be given to the CLI: a comment
    says where they were."""
    args = ["python", "-m", "ffviz", "generate", "--prompt", settings.prompt,
            "--frames", str(frames), "--seed", str(settings.seed), "--policy", policy.name,
            "--budget", str(budget_frames)]
    defaults = type(policy)().params()
    for k, v in policy.params().items():
        if v != defaults.get(k):
            args += ["--policy-arg", f"{k}={v}"]
    for flag, value in (("--steps", settings.steps), ("--context-noise", settings.context_noise)):
        if value is not None:
            args += [flag, str(value)]
    if settings.snap is not None:
        args.append("--snap" if settings.snap else "--no-snap")
    if settings.one_motion is not None:
        args.append("--one-motion" if settings.one_motion else "--no-one-motion")
    if not settings.record:
        args.append("--no-record")
    kind, _, spec = model_name.partition(":")
    if kind == "tiny" and spec:
        args += ["--weights", spec]
    elif kind != "tiny":
        args += ["--model", model_name]
    line = shlex.join(args)
    if switches:
        line += "  # live switches not reproduced: " + ", ".join(
            f"frame {s['frame']} -> {s['policy']} @ {s['budget_frames']}" for s in switches)
    return line


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


class FrameSpool:
    """Every frame of a run, once, in an unnamed file (``dir``: where; default the
    system's temporary folder), and the newest ``ring`` frames in memory.

    The file has no name, so it is gone when the spool is (also after a crash),
    and memory stays flat however long the run: ``all()`` maps the file instead of
    reading it. Appended by the run's thread, read by others (the app's views):
    ``count`` grows only after a chunk's bytes are written.
    """

    def __init__(self, dir: Path | None = None, ring: int = RING):
        self._file = tempfile.TemporaryFile(dir=dir, buffering=0)  # unbuffered: readers see it
        self._ring: collections.deque = collections.deque(maxlen=ring)
        self.count = 0
        self.shape: tuple | None = None  # (H, W, 3) of every frame

    def add(self, frames: np.ndarray) -> None:
        """Append uint8 frames (T, H, W, 3)."""
        if self.shape is not None and frames.shape[1:] != self.shape:
            raise ValueError(f"frames of shape {frames.shape[1:]} after {self.shape}")
        self._file.write(np.ascontiguousarray(frames, np.uint8).tobytes())
        self.shape = frames.shape[1:]
        self._ring.extend(frames)
        self.count += len(frames)

    def __len__(self) -> int:
        return self.count

    def newest(self) -> np.ndarray:
        """The newest frames (at most ``ring``), oldest first."""
        frames = list(self._ring)
        return np.stack(frames) if frames else np.zeros((0, 32, 32, 3), np.uint8)

    def all(self) -> np.ndarray:
        """Every frame so far (T, H, W, 3), read-only, paged in from disk as it is read."""
        count = self.count
        if not count:
            return np.zeros((0, 32, 32, 3), np.uint8)
        return np.memmap(self._file, np.uint8, "r", shape=(count, *self.shape))

    def close(self) -> None:
        self._file.close()


class RunWriter:
    def __init__(self, out_dir: Path, fps: int):
        self.dir = check_output_dir(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._video = imageio.get_writer(self.dir / "video.mp4", fps=fps, codec="libx264",
                                         quality=8, macro_block_size=1,
                                         ffmpeg_log_level="error")
        self._decisions = open(self.dir / "decisions.jsonl", "w", encoding="utf-8")

    def add(self, step: Step) -> None:
        for frame in step.frames:
            scale = max(1, VIDEO_SIDE // max(frame.shape[:2]))  # 32x32 -> 8x; Wan's 480x832 -> 1x
            self._video.append_data(frame.repeat(scale, 0).repeat(scale, 1))
        if step.prompt_switch is not None:  # marks where the prompt changed, before its chunk
            self._decisions.write(json.dumps({"step": step.index, "prompt_switch": step.prompt_switch},
                                             separators=(",", ":")) + "\n")
        if step.decision_log is not None:
            entry = {"step": step.index, "frames": step.frame_indices, "policy": step.policy,
                     "params": step.policy_params, "budget_frames": step.budget_frames,
                     "tokens_before": step.cache_tokens_peak, "tokens_after": step.cache_tokens,
                     **step.decision_log}
            self._decisions.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self, summary: dict, frames: np.ndarray, recorder=None) -> None:
        """Finish the files; ``frames``: the whole video (numpy writes a mapped one to
        frames.npz piece by piece)."""
        self._video.close()
        self._decisions.close()
        np.savez_compressed(self.dir / "frames.npz", frames=frames)
        if recorder is not None:
            recorder.to_npz(self.dir / "record.npz")
        else:
            np.savez_compressed(self.dir / "record.npz", frames=np.zeros(0, np.int64))
        (self.dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n",
                                               encoding="utf-8")

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

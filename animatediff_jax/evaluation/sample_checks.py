"""What `sample` does with what it made when asked: the safety checker over every decoded frame
(`safety_checker`), and the CLIP metrics of its videos (`evaluate.clip`, `evaluate.reference`).

Both models load before the sampling pipeline does (a CLIP folder of the wrong kind is the first
error, not one after minutes of sampling). The domain-similarity reference of each video is the
personalised T2I model's own image for its prompt and seed: the same run with `motion_scale=0`
(every motion module the identity: the spatial model alone, each frame an image), whose frame 0 is
that image.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from animatediff_jax.evaluation import clip_eval
from animatediff_jax.io import fs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class SampleChecks:
    """`SampleChecks(c)` of a validated sample config: loads what its fields ask for."""

    def __init__(self, c: Mapping[str, Any]):
        from animatediff_jax.checkpoints.clip import load_clip, load_safety_checker
        from animatediff_jax.checkpoints.torch_io import CheckpointError

        self.reference = bool(c["evaluate"]["reference"])
        self.safety = self.clip = None
        try:
            if c["safety_checker"]:
                self.safety = load_safety_checker(c["safety_checker"])
        except CheckpointError as e:
            raise type(e)(f"safety_checker: {e}") from None
        try:
            if c["evaluate"]["clip"]:
                self.clip = load_clip(c["evaluate"]["clip"], require=("vision", "text"))
                self.text = clip_eval.TextEmbedder(self.clip)  # its tokenizer checked now, too
        except CheckpointError as e:
            raise type(e)(f"evaluate.clip: {e}") from None
        base = c["base_model"]
        if not c["safety_checker"] and fs.isdir(os.path.join(base, "safety_checker")):
            _log(f"note: {base} has a safety_checker/ but safety_checker is off "
                 f"(--config.safety_checker={os.path.join(base, 'safety_checker')} turns it on)")

    def check(self, frames: np.ndarray, prompts: Sequence, timings: dict) -> np.ndarray:
        """Videos `[N, F, H, W, 3]` with every flagged one black; `timings["nsfw_flags"]` one per video."""
        if self.safety is None:
            return frames
        checked, flags, counts = clip_eval.check_videos(self.safety, list(frames))
        timings["nsfw_flags"] = flags
        for i, (f, n) in enumerate(zip(flags, counts)):
            if f:
                _log(f"safety checker: video {i} ({clip_eval.prompt_text(prompts[i])}) flagged in {n}/{len(frames[i])} "
                     "frames: written black")
        _log(f"safety checker: {sum(flags)} of {len(flags)} video(s) flagged")
        return np.stack(checked)

    def metrics(self, folder: str, frames: np.ndarray, prompts: Sequence,
                motion_free: Callable[[], np.ndarray] | None = None) -> dict | None:
        """The CLIP metrics of the videos (with `evaluate.reference`, against frame 0 of
        `motion_free()`'s videos), printed and written to `folder/metrics.json`."""
        if self.clip is None:
            return None
        refs = None
        if self.reference and motion_free is not None:
            _log("evaluate.reference: sampling the motion-free reference (motion_scale=0, same seeds)")
            refs = [v[0] for v in motion_free()]
        from animatediff_jax.sampling.outputs import slug

        names = [f"{i}-{slug(p)}" for i, p in enumerate(prompts)]  # the file names
        result = clip_eval.evaluate_videos(self.clip, list(frames), list(prompts), refs, text=self.text, names=names)
        _log(clip_eval.format_table(result, width=min(40, 2 + max(len(n) for n in names))))
        clip_eval.write_json(os.path.join(folder, "metrics.json"), result)
        return result

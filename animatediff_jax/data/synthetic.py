"""Procedural moving-square videos with matching captions, for tests and tiny end-to-end runs.

Record `i` is a coloured square on a dark background moving in one of four directions at
constant speed, e.g. "a red square moving left". Content depends only on `(seed, i)`, so it
is the same every epoch (no flips: they would contradict left/right captions); only the
caption dropout varies with the epoch.
"""

from __future__ import annotations

import numpy as np

from animatediff_jax.data.webvid import STREAM_CLIP, ClipSource, Record, record_rng

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def moving_square(
    n_frames: int, size: int, colour: tuple[int, int, int], direction: tuple[int, int], start: tuple[int, int],
    side: int, speed: int, background: int = 20,
) -> np.ndarray:
    """uint8 `[n_frames, size, size, 3]`: the square's corner moves `speed` px per frame, stopping at the edge."""
    video = np.full((n_frames, size, size, 3), background, np.uint8)
    for t in range(n_frames):
        y = min(max(start[0] + direction[0] * speed * t, 0), size - side)
        x = min(max(start[1] + direction[1] * speed * t, 0), size - side)
        video[t, y : y + side, x : x + side] = colour
    return video


class SyntheticVideoSource(ClipSource):
    """`n` moving-square clips of `n_frames` frames at `size x size` (`is_image`: one frame)."""

    def __init__(
        self,
        n: int,
        n_frames: int = 16,
        size: int = 32,
        seed: int = 0,
        *,
        caption_dropout: float = 0.1,
        is_image: bool = False,
    ):
        super().__init__(caption_dropout=caption_dropout, seed=seed)
        if n < 1 or n_frames < 1 or size < 8:
            raise ValueError(f"need n >= 1, n_frames >= 1, size >= 8; got {n}, {n_frames}, {size}")
        self.n, self.n_frames, self.size, self.is_image = int(n), int(n_frames), int(size), is_image

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> dict:
        """The random choices behind record `index` (colour, direction, start, side, speed)."""
        rng = record_rng(self.seed, index, 0, STREAM_CLIP)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        side = max(2, self.size // 4)
        room = self.size - side
        speed = max(1, min(room // max(self.n_frames - 1, 1), max(1, self.size // 16)))
        travel = min(room, speed * (self.n_frames - 1))
        dy, dx = DIRECTIONS[direction]
        # Start so the whole path stays inside the frame; free coordinate anywhere.
        lo_y, hi_y = (travel, room) if dy < 0 else (0, room - travel if dy > 0 else room)
        lo_x, hi_x = (travel, room) if dx < 0 else (0, room - travel if dx > 0 else room)
        start = (int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1)))
        return dict(colour=colour, direction=direction, start=start, side=side, speed=speed)

    def frames(self, index: int) -> np.ndarray:
        """uint8 `[n_frames, size, size, 3]` of record `index` (before `is_image` frame selection)."""
        d = self.describe(index)
        colour, direction = COLOURS[d["colour"]], DIRECTIONS[d["direction"]]
        return moving_square(self.n_frames, self.size, colour, direction, d["start"], d["side"], d["speed"])

    def _load(self, index: int, epoch: int, seed: int) -> Record:
        d = self.describe(index)
        video = self.frames(index)
        if self.is_image:
            t = int(record_rng(seed, index, epoch, STREAM_CLIP).integers(self.n_frames))
            video = video[t : t + 1]
        return {"video": video, "text": f"a {d['colour']} square moving {d['direction']}"}

"""Video files in and out (GIF, MP4, PNG frames) as uint8 `[F, H, W, 3]` arrays."""

from animatediff_jax.io.video import (
    VideoReadError,
    count_frames,
    read_video,
    tile_videos,
    to_uint8,
    write_gif,
    write_grid,
    write_mp4,
    write_pngs,
    write_video,
)

__all__ = [
    "VideoReadError",
    "count_frames",
    "read_video",
    "tile_videos",
    "to_uint8",
    "write_gif",
    "write_grid",
    "write_mp4",
    "write_pngs",
    "write_video",
]

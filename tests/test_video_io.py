"""Video writers and readers: write, read back with PyAV, compare pixel values."""

import numpy as np
import pytest

from animatediff_jax.io import (
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

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [20, 20, 20], [200, 100, 50]], np.uint8)


def flat_video(n_frames=6, h=24, w=32, offset=0):
    """A few flat colours per frame (a background and a square), distinct from frame to frame."""
    v = np.empty((n_frames, h, w, 3), np.uint8)
    for t in range(n_frames):
        v[t] = PALETTE[(t + offset) % len(PALETTE)]
        v[t, 4:12, 2 + 2 * t : 10 + 2 * t] = PALETTE[(t + offset + 1) % len(PALETTE)]
    return v


def test_to_uint8_matches_diffusers_rounding():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0], np.float32)
    ref = np.round(np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8)  # diffusers' numpy_to_pil
    np.testing.assert_array_equal(to_uint8(x), ref)
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 166, 255, 255]


def test_gif_roundtrip_exact(tmp_path):
    video = flat_video()
    path = tmp_path / "a.gif"
    write_gif(path, video, fps=8)
    back = read_video(path)
    np.testing.assert_array_equal(back, video)
    assert count_frames(path) == len(video)


def test_mp4_roundtrip_close(tmp_path):
    video = flat_video(n_frames=10, h=32, w=48)
    path = tmp_path / "a.mp4"
    write_mp4(path, video, fps=8)
    back = read_video(path)
    assert back.shape == video.shape
    err = np.abs(back.astype(np.int32) - video).mean()
    assert err < 3.0, f"mean abs error {err:.2f} levels"
    assert count_frames(path) == 10 and count_frames(path, decode=True) == 10
    # Frame selection returns the same pixels as full decoding, in the order asked.
    np.testing.assert_array_equal(read_video(path, [7, 2, 2]), back[[7, 2, 2]])


def test_mp4_odd_size_is_padded(tmp_path):
    video = np.broadcast_to(PALETTE[:3, None, None], (3, 17, 21, 3)).copy()  # flat frames: no chroma edges
    write_mp4(tmp_path / "odd.mp4", video, fps=4)
    back = read_video(tmp_path / "odd.mp4").astype(np.int32)
    assert back.shape == (3, 18, 22, 3)
    assert np.abs(back[:, :17, :21] - video).mean() < 3.0
    assert np.abs(back[:, 17:, :] - back[:, 16:17, :]).max() <= 3  # edge-replicated padding


def test_pngs_lossless(tmp_path):
    video = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    paths = write_pngs(tmp_path / "frames", video)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["0000.png", "0001.png", "0002.png"]
    from PIL import Image

    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in paths]), video)


def test_grid_tiles_row_major(tmp_path):
    videos = np.stack([flat_video(n_frames=4, h=8, w=10, offset=i) for i in range(3)])
    grid = tile_videos(videos, cols=2, padding=1)
    assert grid.shape == (4, 17, 21, 3)
    np.testing.assert_array_equal(grid[:, :8, :10], videos[0])
    np.testing.assert_array_equal(grid[:, :8, 11:], videos[1])
    np.testing.assert_array_equal(grid[:, 9:, :10], videos[2])
    assert (grid[:, 9:, 11:] == 0).all() and (grid[:, 8] == 0).all()  # empty cell and gap are black
    write_grid(tmp_path / "grid.gif", videos, fps=4, cols=2, padding=1)
    np.testing.assert_array_equal(read_video(tmp_path / "grid.gif"), grid)
    write_grid(tmp_path / "grid.mp4", videos, fps=4)  # default cols = ceil(sqrt(3)) = 2, no padding
    assert read_video(tmp_path / "grid.mp4").shape == (4, 16, 20, 3)


def test_write_video_dispatch_and_errors(tmp_path):
    video = flat_video(n_frames=2)
    write_video(tmp_path / "v.gif", video)
    write_video(tmp_path / "pngs", video)
    np.testing.assert_array_equal(read_video(tmp_path / "v.gif"), video)
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["0000.png", "0001.png"]
    with pytest.raises(ValueError, match="uint8"):
        write_gif(tmp_path / "x.gif", video.astype(np.float32))
    with pytest.raises(VideoReadError):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoReadError):
        read_video(tmp_path / "junk.mp4")
    write_mp4(tmp_path / "short.mp4", video, fps=4)
    with pytest.raises(VideoReadError, match="fewer frames"):
        read_video(tmp_path / "short.mp4", [0, 5])


def test_mp4_mpeg4_fallback(tmp_path, monkeypatch):
    """PyAV builds without libx264 write MPEG-4 Part 2 instead: still readable, still close."""
    import animatediff_jax.io.video as video_mod

    monkeypatch.setattr(video_mod, "_mp4_codec", lambda: "mpeg4")
    video = np.broadcast_to((np.arange(6) * 40)[:, None, None, None], (6, 32, 48, 3)).astype(np.uint8)
    write_mp4(tmp_path / "m4.mp4", video, fps=8)
    back = read_video(tmp_path / "m4.mp4")
    assert back.shape == video.shape and np.abs(back.astype(np.int32) - video).mean() < 3.0


def test_sparsectrl_keyframes_are_centre_cropped_as_the_original(tmp_path):
    """`fit="crop"` (SparseCtrl keyframes): the original's `RandomResizedCrop((H, W), scale=(1, 1),
    ratio=(W/H, W/H))` + bilinear, i.e. the centred crop of the video's aspect ratio, then resized;
    `fit="stretch"` (ControlNet images, diffusers' processor): the whole image, Lanczos."""
    from PIL import Image

    from animatediff_jax.io.video import read_image

    rng = np.random.default_rng(0)
    for shape, size, box in [((32, 64, 3), (16, 16), (16, 0, 48, 32)),  # wide -> square: the middle columns
                             ((64, 32, 3), (16, 16), (0, 16, 32, 48)),  # tall -> square: the middle rows
                             ((32, 64, 3), (16, 32), (0, 0, 64, 32)),  # the same ratio: whole
                             ((30, 40, 3), (24, 24), (5, 0, 35, 30))]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        path = tmp_path / f"{shape[0]}x{shape[1]}.png"
        Image.fromarray(img).save(path)
        want = np.asarray(Image.fromarray(img).crop(box).resize((size[1], size[0]), Image.BILINEAR))
        np.testing.assert_array_equal(read_image(path, size, fit="crop"), want)
        stretched = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.LANCZOS))
        np.testing.assert_array_equal(read_image(path, size), stretched)

"""`animatediff-jax evaluate --clip CLIP_FOLDER --videos DIR|FILES... [--prompts FILE] [--reference DIR]
[--safety-checker PATH] [--out metrics.json]`

The paper's CLIP metrics of videos (`animatediff_jax.evaluation`): text alignment (mean cosine of
each frame with its prompt, and x100 as `clip_score`), domain similarity (with `--reference`: each
frame against the personalised T2I model's image for the same prompt and seed), motion smoothness
(consecutive frames) and frame consistency (all pairs). Prints a table (per video, mean ± std) and
writes JSON (default: `metrics.json` in the videos' folder, or here when they come from several).

`--videos`: GIF / MP4 files, folders of PNG frames, folders of those, or a `sample` run's folder
(its `sample/` videos, its `config.yaml` prompts). `--prompts FILE`: one per line, in the videos'
(natural file-name) order; without it prompts come from a `sample` run's `config.yaml` in or above the
videos' folder, or from our file names (`<i>-<prompt words>`); without any, text alignment is
skipped (and said). `--reference DIR`: a folder of images (or videos: their first frames), one per
video, by name or in order; a `sample` run with `--config.motion_scale=0` and the same seeds makes
them (its videos' frames are the T2I model's own images). `--safety-checker`: SD1.5's
`safety_checker/` (or the pipeline folder): flags recorded per video.

`--clip`: a transformers CLIP folder: `openai/clip-vit-large-patch14` (AnimateDiff-style numbers) or
`openai/clip-vit-base-patch32` (CLIPScore-style). Exit codes: 0 done; 2 bad input (one line `error: ...`
naming the file: a CLIP folder of another kind, a prompts count mismatch, frames of different sizes,
an unreadable video); 1 writing the JSON failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from animatediff_jax.cli import run_command


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="animatediff-jax evaluate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="transformers CLIP folder (CLIPModel with both towers)")
    p.add_argument("--videos", required=True, nargs="+", help="video files, frame folders, or folders of them")
    p.add_argument("--prompts", help="prompts file, one per line, in the videos' order")
    p.add_argument("--reference", help="folder of reference images (first frames of videos), one per video")
    p.add_argument("--safety-checker", dest="safety_checker", help="SD safety_checker/ folder")
    p.add_argument("--out", help="JSON file (default: metrics.json in the videos' folder)")
    return p


def evaluate(args: argparse.Namespace) -> tuple[dict, str]:
    """`(result, default JSON path)` of the parsed arguments."""
    from animatediff_jax.checkpoints.clip import load_clip, load_safety_checker
    from animatediff_jax.evaluation import clip_eval, inputs

    videos, folder = inputs.find_videos(args.videos)
    prompts, source = inputs.resolve_prompts(videos, folder, args.prompts)
    refs = inputs.find_references(args.reference, videos) if args.reference else None
    frames = [inputs.read_video(v) for v in videos]  # every file read (and checked) before CLIP loads
    references = [inputs.read_reference(r) for r in refs] if refs is not None else None
    clip = load_clip(args.clip, require=("vision", "text") if prompts is not None else ("vision",))
    safety = load_safety_checker(args.safety_checker) if args.safety_checker else None
    if prompts is None:
        _log("no prompts (no --prompts, no sample config.yaml, file names not <i>-<prompt>): text alignment skipped")
    else:
        _log(f"prompts from {source}")
    result = clip_eval.evaluate_videos(clip, frames, prompts, references, safety, names=[v.name for v in videos])
    for row, v in zip(result["videos"], videos):
        row["path"] = v.path
    result["prompt_source"] = source
    result["reference"] = os.path.abspath(args.reference) if args.reference else None
    config = inputs.find_config(folder)  # a sample run's folder: beside its config.yaml and timings.json
    default = os.path.dirname(config) if config else folder if folder is not None else "."
    return result, os.path.join(default, "metrics.json")


def _command(argv: Sequence[str]) -> None:
    from animatediff_jax.evaluation import clip_eval

    args = parser().parse_args(argv)
    result, default = evaluate(args)
    print(clip_eval.format_table(result))
    out = args.out or default
    clip_eval.write_json(out, result)
    _log(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_command, argv)


if __name__ == "__main__":
    sys.exit(main())

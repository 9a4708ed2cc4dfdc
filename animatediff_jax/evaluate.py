"""`animatediff-jax evaluate --clip CLIP_FOLDER --videos DIR|FILES... [--prompts FILE] [--reference DIR]
[--safety-checker PATH] [--out metrics.json] [--overwrite]`

The paper's CLIP metrics of videos (`animatediff_jax.evaluation`): text alignment (mean cosine of
each frame with its prompt, and x100 as `clip_score`), domain similarity (with `--reference`: each
frame against the personalised T2I model's image for the same prompt and seed), motion smoothness
(consecutive frames) and frame consistency (all pairs). Prints a table (per video, mean ± std) and
writes JSON (default: `metrics.json` in the videos' folder, or here when they come from several: the
evaluation of those videos, rewritten by each run). An existing `--out` FILE is replaced only with
`--overwrite` (checked before anything is read), never an input.

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
an unreadable video, an existing output without `--overwrite`); 1 writing the JSON failed; 130
interrupted (Ctrl-C: nothing written).
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file (never an input)")
    return p


def output_path(args: argparse.Namespace, folder: str | None) -> str:
    """Where the JSON goes: `--out`, else `metrics.json` beside a `sample` run's config.yaml, in the
    videos' one folder, or here."""
    from animatediff_jax.evaluation import inputs

    if getattr(args, "out", None):
        return args.out
    config = inputs.find_config(folder)  # a sample run's folder: beside its config.yaml and timings.json
    default = os.path.dirname(config) if config else folder if folder is not None else "."
    return os.path.join(default, "metrics.json")


def check_output(args: argparse.Namespace, videos, out: str) -> None:
    """The overwrite rule of every command (`io.fs.check_output`): an existing `--out` only with
    `--overwrite` (the default `metrics.json` beside the videos is theirs: rewritten), never one of
    the files read (a video, the prompts file)."""
    from animatediff_jax.io.fs import check_output as check

    files = [v.path for v in videos if v.kind != "frames"] + [p for p in (getattr(args, "prompts", None),) if p]
    check(out, tuple(files), overwrite=getattr(args, "overwrite", False) or not getattr(args, "out", None))


def evaluate(args: argparse.Namespace) -> tuple[dict, str]:
    """`(result, JSON path)` of the parsed arguments (the path checked by `check_output` first)."""
    from animatediff_jax.checkpoints.clip import load_clip, load_safety_checker
    from animatediff_jax.cli import one_line
    from animatediff_jax.errors import ConfigError
    from animatediff_jax.evaluation import clip_eval, inputs

    videos, folder = inputs.find_videos(args.videos)
    out = output_path(args, folder)
    check_output(args, videos, out)
    prompts, source = inputs.resolve_prompts(videos, folder, args.prompts)
    refs = inputs.find_references(args.reference, videos) if args.reference else None
    frames = [inputs.read_video(v) for v in videos]  # every file read (and checked) before CLIP loads
    references = [inputs.read_reference(r) for r in refs] if refs is not None else None
    clip = load_clip(args.clip, require=("vision", "text") if prompts is not None else ("vision",))
    safety = load_safety_checker(args.safety_checker) if args.safety_checker else None
    if prompts is None:
        _log("no prompts (no --prompts, no sample config.yaml, file names not <i>-<prompt>): text alignment skipped")
    else:
        try:  # the CLIP folder's tokenizer files (a user's folder), before any video is embedded
            clip_eval.tokenizer(clip)
        except ValueError as e:
            raise ConfigError(one_line(e)) from e
        _log(f"prompts from {source}")
    result = clip_eval.evaluate_videos(clip, frames, prompts, references, safety, names=[v.name for v in videos])
    for row, v in zip(result["videos"], videos):
        row["path"] = v.path
    result["prompt_source"] = source
    result["reference"] = os.path.abspath(args.reference) if args.reference else None
    return result, out


def _command(argv: Sequence[str]) -> None:
    from animatediff_jax import interrupts
    from animatediff_jax.evaluation import clip_eval

    args = parser().parse_args(argv)
    result, out = evaluate(args)
    interrupts.output(out)
    print(clip_eval.format_table(result))
    clip_eval.write_json(out, result)
    _log(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_command, argv)


if __name__ == "__main__":
    sys.exit(main())

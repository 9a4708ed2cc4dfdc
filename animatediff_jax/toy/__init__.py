"""The toy world: the whole AnimateDiff recipe, end to end, on a laptop CPU with no downloads.

`world` writes procedural shape videos as a WebVid-style dataset, `base` trains a tiny
pixel-space text-to-image model on their frames (the stand-in for a personalised SD1.5),
the three AnimateDiff stages train on top of it with the normal `train` machinery
(`configs/toy/`), `metrics` measures whether generated videos move as prompted, and `demo`
(`animatediff-jax demo`) runs or loads it all and writes GIFs plus the metric tables.
"""

"""Replays a saved run: the `config.yaml` a sample run wrote (its seeds resolved) as a config.

    animatediff-jax sample --config configs/sample/replay.py:samples/tiny-2025-01-01T12-00-00/config.yaml

gives the same videos again, in a new `output.dir` (a non-empty one is never mixed: `<dir>-2`, ...).
Fields can be overridden as with any config (`--config.steps=30` for a variation of that run).
"""

from animatediff_jax.sampling.config import from_yaml


def get_config(path: str):
    return from_yaml(path)

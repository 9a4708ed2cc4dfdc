"""Motion modules, MotionLoRAs and domain adapters: PyTorch files (original and diffusers) <-> params."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from animatediff_jax.checkpoints.torch_io import CheckpointError, Params, StateDict, torch_to_flax
from animatediff_jax.models.config import UNetConfig
from animatediff_jax.models.layers import sinusoidal_table
from animatediff_jax.models.unet import param_shapes

PE_SUFFIXES = (".pos_embed.pe", ".pos_encoder.pe")


def split_position_tables(state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, int | None]:
    """Removes the (deterministic) sinusoidal `pe` buffers, checking they hold the standard table.

    Returns the remaining state dict and the table length (24 for v1, 32 for v2/v3), or None.
    """
    rest, lengths = {}, set()
    for k, v in state_dict.items():
        if not k.endswith(PE_SUFFIXES):
            rest[k] = v
            continue
        v = np.asarray(v, np.float32).reshape(v.shape[-2], v.shape[-1])
        expected = np.asarray(sinusoidal_table(*v.shape))
        if not np.allclose(v, expected, atol=1e-4):
            raise CheckpointError(f"{k}: position table is not the sinusoidal table AnimateDiff uses")
        lengths.add(v.shape[0])
    if len(lengths) > 1:
        raise CheckpointError(f"position tables of different lengths in one checkpoint: {sorted(lengths)}")
    return rest, (lengths.pop() if lengths else None)


def convert_unet_state_dict(state_dict: Mapping, config: UNetConfig, *, what: str = "UNet checkpoint") -> Params:
    """A whole diffusers-named UNet (`UNet2DConditionModel` or `UNetMotionModel`) state dict -> params."""
    sd = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    sd, length = split_position_tables(sd)
    if length is not None and config.motion is not None and length != config.motion.max_positions:
        raise CheckpointError(
            f"{what}: position tables of length {length}, but the config's motion layout has {config.motion.max_positions}"
        )
    return torch_to_flax(sd, param_shapes(config), what=what)

"""AnimateDiff's motion module: a temporal transformer over the frame axis, added as a residual.

Input and output are `(B*F, H, W, C)` like every spatial layer of the UNet; the module
regroups to `(B*H*W, F, C)` so attention runs along frames only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax import parallel
from animatediff_jax.models.config import MotionConfig
from animatediff_jax.models.layers import (
    BasicTransformerBlock,
    Dtype,
    GroupNorm,
    TemporalWindows,
    dense,
    group_norm_frames,
)


class MotionModule(nn.Module):
    """GroupNorm -> proj_in -> temporal transformer blocks -> proj_out (zero-init) -> `scale` x that + input.

    Param names follow diffusers' `AnimateDiffTransformer3D` (`norm`, `proj_in`,
    `transformer_blocks_0/{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`); the original
    checkpoint names are mapped onto these in `checkpoints.motion`.
    """

    config: MotionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale: float = 1.0  # multiplies what the module adds to its input (motion strength; 0: no motion)
    position_stretch: tuple[int, int] | None = None  # (n, m): its first n positions spread over m frames
    # diffusers' FreeNoise: the blocks' attentions per window of frames (`layers.TemporalWindows`); None: all frames
    windows: TemporalWindows | None = None

    @nn.compact
    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        cfg = self.config
        if cfg.self_attentions not in (1, 2):
            raise ValueError(f"MotionConfig.self_attentions={cfg.self_attentions}: expected 1 or 2")
        bf, h, w, c = x.shape
        x = parallel.spread_rows(x)  # (context parallelism: the frames arrive on their devices; regrouped below)
        b = bf // num_frames
        norm = GroupNorm(cfg.norm_num_groups, 1e-6, self.dtype, self.param_dtype, name="norm")
        hs = group_norm_frames(norm, x.reshape(b, num_frames, h, w, c), per_frame=cfg.norm_per_frame)
        # Under context parallelism (frames split over devices) this regrouping is one all-to-all:
        # afterwards each device holds every frame of its share of the positions.
        hs = parallel.spread_rows(hs.transpose(0, 2, 3, 1, 4).reshape(b * h * w, num_frames, c))
        hs = dense(c, "proj_in", dtype=self.dtype, param_dtype=self.param_dtype)(hs)
        for i in range(cfg.num_layers):
            hs = BasicTransformerBlock(
                cfg.heads,
                c // cfg.heads,
                double_self=True,
                max_positions=cfg.max_positions,
                position_stretch=self.position_stretch,
                windows=self.windows,
                second_attention=cfg.self_attentions == 2,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"transformer_blocks_{i}",
            )(hs)
        hs = nn.Dense(
            c, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros, name="proj_out"
        )(hs)
        hs = parallel.spread_rows(hs.reshape(b, h, w, num_frames, c).transpose(0, 3, 1, 2, 4).reshape(bf, h, w, c))
        return (hs if self.scale == 1.0 else self.scale * hs) + x

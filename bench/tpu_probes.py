"""Speed ideas measured and not adopted: each compiles a real-size program for a TPU (libtpu, no chip)
exactly as `animatediff-jax compile` does, with one thing changed, and prints the same report.

    pip install "jax[tpu]" "animatediff-jax[int8]"
    python bench/tpu_probes.py sample-static --topology v5e-1   # sampler, int8 with static activation scales
    python bench/tpu_probes.py train-weights --topology v5e-1   # stage-2 step over an int8-weight frozen base
    python bench/tpu_probes.py frames-major --topology v5e-1    # stage-2 step, motion modules without transposes
    python bench/tpu_probes.py frames-major --what sample       # ... the sampler

Compare with `animatediff-jax compile sample --config configs/sample/v2_motion_lora_zoom_in.py --topology
v5e-1 --quick --config.batch_size=4` (and `--config.quantize=int8`), and with `animatediff-jax compile
train --config configs/train/stage2_motion_module.py --topology v5e-1 --quick --config.train.batch_size=4`.

- `sample-static`: qwix's static-range quantization (`act_static_scale`): one float32 scale per activation
  tensor, fixed in advance, so no absmax pass over the activation at run time. The scales are abstract here
  (only the program's cost is measured; real ones would come from calibration runs).
- `train-weights`: the frozen spatial UNet's linear kernels int8 (the sampler's `int8_weights`) inside the
  stage-2 train step; the motion modules train in float32 as usual. (Full int8 cannot train through: the
  rounding of each activation has zero gradient, so nothing reaches the motion modules below it.)
- `frames-major`: the motion modules keep the video as `(B, F, H*W, C)`, with no `(B*H*W, F, C)` regrouping:
  the temporal attention runs along axis 1 with positions x heads as its heads (`FramesMajorMotionModule`,
  the same params and the same numbers, a test checks; no position stretch, windows or context parallelism).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

SAMPLE = ("sample", "configs/sample/v2_motion_lora_zoom_in.py", ["--config.batch_size=4"])
TRAIN = ("train", "configs/train/stage2_motion_module.py", ["--config.train.batch_size=4"])


def static_scales() -> None:
    """`quantize=int8` with one static scale per activation tensor (qwix SRQ)."""
    import jax
    import jax.numpy as jnp
    import qwix
    from flax import traverse_util

    from animatediff_jax.models import quantize

    def rules(mode: str) -> list:
        ops = ("dot_general", "conv_general_dilated")
        # act_batch_axes (0, 1): the scale is averaged over the batch and the token / row axis: one per tensor.
        return [qwix.QtRule(module_path=quantize._KEEP, op_names=ops),
                qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8, op_names=ops,
                            act_static_scale=True, act_batch_axes=(0, 1))]

    def abstract_params(model, params, mode, *args, **kwargs):
        init = functools.partial(quantize.quantized(model, mode).init, **kwargs)
        params = jax.eval_shape(init, jax.random.key(0), *args)["params"]  # int8 kernels + activation scales
        scales = [k for k in traverse_util.flatten_dict(params) if k[-1].endswith("_lhs_scale")]
        print(f"probe: {len(scales)} static activation scales", file=sys.stderr)
        return params

    quantize._rules = rules
    quantize.quantize_params = abstract_params


def int8_frozen_base() -> None:
    """The stage-2 program with its frozen UNet's linear kernels in int8 (`quantize=int8_weights`)."""
    import jax
    import numpy as np

    import animatediff_jax.training as training
    from animatediff_jax import parallel
    from animatediff_jax.models import quantize
    from animatediff_jax.sampling.pipeline import cast_floating, quantize_unet
    from animatediff_jax.training import program as programs

    make = programs.make_program

    def make_program(config, models, mesh, stage=None):
        prog = make(config, models, mesh, stage)
        unet = prog.frozen["unet"]
        f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32), unet)
        q = cast_floating(quantize_unet(models.unet_config, f32, "int8_weights"), jax.tree.leaves(unet)[0].dtype)
        frozen = {**prog.frozen, "unet": q}
        n = sum(map(quantize.is_quantized, jax.tree.leaves(q, is_leaf=quantize.is_quantized)))
        print(f"probe: {n} int8 kernels in the frozen UNet", file=sys.stderr)
        return dataclasses.replace(prog, frozen=frozen,
                                   spec=dataclasses.replace(prog.spec, unet=quantize.quantized(prog.spec.unet,
                                                                                               "int8_weights")),
                                   frozen_sharding=parallel.param_shardings(frozen, mesh, prog.rules))

    training.make_program = make_program


def frames_major_module():
    """`models.motion_module.MotionModule` laid out frames-major (no transposes; position stretch, FreeNoise
    windows and context parallelism left out): the probe's model, which a test compares with the real one."""
    import flax.linen as nn

    from animatediff_jax.models import attention, motion_module
    from animatediff_jax.models.layers import FeedForward, GroupNorm, dense, group_norm_frames, position_table

    class TemporalAttention(nn.Module):
        heads: int
        dim_head: int
        dtype: object
        param_dtype: object

        @nn.compact
        def __call__(self, x):  # [B, F, P, C] -> attention along F, heads P x heads
            b, f, p, c = x.shape
            inner, kw = self.heads * self.dim_head, dict(dtype=self.dtype, param_dtype=self.param_dtype)
            split = lambda t: t.reshape(b, f, p * self.heads, self.dim_head)  # noqa: E731
            q, k, v = (split(dense(inner, n, use_bias=False, **kw)(x)) for n in ("to_q", "to_k", "to_v"))
            o = attention.dot_product_attention(q, k, v).reshape(b, f, p, inner)
            return dense(c, "to_out_0", **kw)(o)

    class TemporalBlock(nn.Module):
        heads: int
        dim_head: int
        max_positions: int
        second_attention: bool
        dtype: object
        param_dtype: object

        @nn.compact
        def __call__(self, x):
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
            pe = position_table(self.max_positions, x.shape[-1])[: x.shape[1], None].astype(self.dtype)
            x = TemporalAttention(self.heads, self.dim_head, name="attn1", **kw)(ln("norm1")(x) + pe) + x
            if self.second_attention:
                x = TemporalAttention(self.heads, self.dim_head, name="attn2", **kw)(ln("norm2")(x) + pe) + x
            return FeedForward(4, name="ff", **kw)(ln("norm3")(x)) + x

    class FramesMajorMotionModule(motion_module.MotionModule):
        @nn.compact
        def __call__(self, x, num_frames):
            cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
            bf, h, w, c = x.shape
            b = bf // num_frames
            norm = GroupNorm(cfg.norm_num_groups, 1e-6, name="norm", **kw)
            hs = group_norm_frames(norm, x.reshape(b, num_frames, h, w, c), per_frame=cfg.norm_per_frame)
            hs = dense(c, "proj_in", **kw)(hs.reshape(b, num_frames, h * w, c))
            for i in range(cfg.num_layers):
                hs = TemporalBlock(cfg.heads, c // cfg.heads, cfg.max_positions, cfg.self_attentions == 2,
                                   name=f"transformer_blocks_{i}", **kw)(hs)
            hs = nn.Dense(c, name="proj_out", **kw)(hs)
            return self.scale * hs.reshape(bf, h, w, c) + x

    return FramesMajorMotionModule


def frames_major() -> None:
    """Every UNet built from here on uses `frames_major_module()` for its motion modules."""
    from animatediff_jax.models import motion_module, unet

    defaults = list(unet._Layers.__init__.__defaults__)  # (the motion-module class is a default argument)
    defaults[defaults.index(motion_module.MotionModule)] = frames_major_module()
    unet._Layers.__init__.__defaults__ = tuple(defaults)


PROBES = {"sample-static": (static_scales, SAMPLE), "train-weights": (int8_frozen_base, TRAIN),
          "frames-major": (frames_major, TRAIN)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("probe", choices=sorted(PROBES))
    p.add_argument("--topology", default="v5e-1")
    p.add_argument("--config", default="", help="another config (overrides after it: --config.FIELD=VALUE)")
    p.add_argument("--what", choices=("sample", "train"), default="", help="the other program (frames-major)")
    p.add_argument("--breakdown", type=int, default=0)
    args, rest = p.parse_known_args(argv)
    patch, (what, config, defaults) = PROBES[args.probe]
    if args.what and args.what != what:
        what, config, defaults = SAMPLE if args.what == "sample" else TRAIN
    patch()
    from animatediff_jax import compile as compile_command

    extra = ["--config.quantize=int8"] if args.probe == "sample-static" else []
    return compile_command.main([what, "--config", args.config or config, "--topology", args.topology, "--quick",
                                 "--breakdown", str(args.breakdown), *(defaults if not args.config else []), *extra,
                                 *rest])


if __name__ == "__main__":
    sys.exit(main())

"""The toy world's text-to-image base model: the stand-in for a personalised SD1.5.

Three parts, all ordinary models of this package at toy size, stored as a converted SD1.5
folder (`params_io.save_converted`) so every later step (`train` stages 1-3 with
`model.pretrained`, the sampler) loads it like real SD1.5 weights:

* text encoder: `CLIPTextConfig.tiny()` (vocabulary 1000, width 32) with *frozen random*
  weights, read with the toy word-hashing tokenizer (`data.tokenizer = "hash"`). SD1.5 trains
  its UNet under a frozen CLIP too; a random encoder still gives every caption its own embedding.
* VAE: a pixel-space identity *inside* diffusers' `AutoencoderKL` architecture
  (`pixel_vae_params`, built analytically, no training): latents are the RGB pixels in [-1, 1],
  so 16x16 frames are 16x16x3 latents. The only non-linear path of the VAE (GroupNorm, SiLU,
  conv) is made exact to ~1e-6: the image rides next to two constant channels of +-K with
  K >> 1, so the GroupNorm's statistics are those constants (mean 0, std K/2) whatever the
  image, and SiLU is evaluated at 20 + x, where it is the identity to 1e-7.
* UNet: `tiny_unet` with 3 in/out channels, widths (32, 64), attention at the 8x8 level only
  (at 16x16 it would cost more than everything else), trained here from random weights on
  single clean frames of the toy world ("images" dataset) with the training package's own
  loss, optimizer and step (`training.step`): the stage below is the whole UNet, no LoRA.

`python -m animatediff_jax.toy.base --config configs/toy/base.py` trains it (any
`--config.<field>=` override works as for `animatediff-jax train`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import UNetConfig, tiny_unet
from animatediff_jax.models.vae import VAEConfig

Params = dict[str, Any]

SIZE = 16  # frame size the toy models work at (pixels = latents)
_K = 1000.0  # the constant channels' magnitude (see module docstring)
_SILU_SHIFT = 20.0  # SiLU(20 + x) = 20 + x to 1e-7 for |x| < 5


def unet_config() -> UNetConfig:
    """The toy UNet: pixel space (3 channels), widths 32/64, cross attention at 8x8 only."""
    return tiny_unet(None, in_channels=3, out_channels=3, cross_attention_dim=32, block_out_channels=(32, 64),
                     cross_attn_blocks=(False, True))


def text_config() -> CLIPTextConfig:
    return CLIPTextConfig.tiny()


def vae_config() -> VAEConfig:
    """One block (no down/up-sampling), 8 channels, one GroupNorm group, latents = RGB, scale 1."""
    return VAEConfig(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
                     norm_num_groups=1, scaling_factor=1.0)


def pixel_vae_params(config: VAEConfig | None = None) -> Params:
    """Weights that make `AutoencoderKL(config)` an identity: encode -> (x, logvar -30), decode(z) = z.

    Every residual branch (resnets' `conv2`, attentions' `to_out_0`) is zero, so the blocks pass
    their input through. `conv_in` writes `[x, -x, K, -K]` into the 8 channels: their single
    GroupNorm group has mean exactly 0 and std K/2 (to 1e-6 relative for |x| <= 1), so
    `conv_norm_out` with scale K/2 and bias 20 gives 20 + x on the image channels, SiLU keeps it,
    and `conv_out` subtracts the 20 again.
    """
    from flax.traverse_util import flatten_dict, unflatten_dict

    from animatediff_jax.models.shapes import vae_shapes

    cfg = config or vae_config()
    n_img, lat, width = cfg.in_channels, cfg.latent_channels, cfg.block_out_channels[0]
    if len(cfg.block_out_channels) != 1 or cfg.norm_num_groups != 1 or width < 2 * n_img + 2 or lat != n_img:
        raise ValueError(f"pixel_vae_params needs one block of >= {2 * n_img + 2} channels, one group and "
                         f"latent_channels == in_channels, got {cfg}")
    flat = {k: np.zeros(v.shape, np.float32) for k, v in flatten_dict(vae_shapes(cfg)).items()}
    for k, v in flat.items():
        if k[-1] == "scale":  # norms whose output is discarded: plain unit scale
            v[:] = 1.0

    def split_in(prefix: str, ch: int) -> None:
        kern, bias = flat[prefix + ("kernel",)], flat[prefix + ("bias",)]
        for c in range(ch):
            kern[1, 1, c, c], kern[1, 1, c, ch + c] = 1.0, -1.0
        bias[2 * ch], bias[2 * ch + 1] = _K, -_K

    def merge_out(prefix: tuple[str, ...], ch: int, extra_bias: dict[int, float]) -> None:
        scale, shift = flat[prefix + ("conv_norm_out", "scale")], flat[prefix + ("conv_norm_out", "bias")]
        scale[:] = 0.0
        # std of the group = sqrt(mean of squares) = sqrt((2 K^2 + ...) / width)
        scale[:ch] = _K * np.sqrt(2.0 / width)
        shift[:ch] = _SILU_SHIFT
        kern, bias = flat[prefix + ("conv_out", "kernel")], flat[prefix + ("conv_out", "bias")]
        for c in range(ch):
            kern[1, 1, c, c] = 1.0
        bias[:ch] = -_SILU_SHIFT
        for c, v in extra_bias.items():
            bias[c] = v

    split_in(("encoder", "conv_in"), n_img)
    merge_out(("encoder",), lat, {lat + c: -30.0 for c in range(lat)})  # logvar at its clamp: ~no noise
    split_in(("decoder", "conv_in"), lat)
    merge_out(("decoder",), cfg.out_channels, {})
    for name, n in (("quant_conv", 2 * lat), ("post_quant_conv", lat)):
        flat[(name, "kernel")][0, 0] = np.eye(n, dtype=np.float32)
    return unflatten_dict(flat)


def init_params(seed: int = 0) -> Params:
    """Random UNet and text encoder (host numpy, `random_params`), analytic pixel VAE."""
    from animatediff_jax.models.init import random_params
    from animatediff_jax.models.shapes import clip_shapes, unet_shapes

    return {
        "unet": random_params(unet_shapes(unet_config()), seed, like_init=True),
        "vae": pixel_vae_params(),
        "text_encoder": random_params(clip_shapes(text_config()), seed + 2, like_init=True),
    }


def base_stage():
    """The base model's "stage": the whole (motion-free) UNet trains, on single frames, nothing attached."""
    from animatediff_jax.training.stages import Stage

    return Stage(name="toy_base", kind="subtree", targets=lambda path: True, motion_modules=False, single_frame=True,
                 attach=(), export="model")


INFO_FILE = "toy.json"  # next to params.safetensors: what a sampler must know besides the weights


def save_model(folder: str | os.PathLike, params: Params, prediction_type: str = "epsilon") -> None:
    """Writes the base model as a converted SD1.5 folder (`model.pretrained` of the stage configs),
    plus `toy.json` with its prediction type and frame size (the sampler's scheduler needs the former)."""
    from animatediff_jax.checkpoints.sd15 import SD15, save_converted

    save_converted(folder, SD15(unet_config(), vae_config(), text_config(), jax.tree.map(np.asarray, params)))
    with open(os.path.join(folder, INFO_FILE), "w") as f:
        json.dump({"prediction_type": prediction_type, "size": SIZE, "tokenizer": "hash"}, f)


def read_info(folder: str | os.PathLike) -> dict:
    """`toy.json` of a base model folder."""
    with open(os.path.join(os.fspath(folder), INFO_FILE)) as f:
        return json.load(f)


def model_folder(config) -> str:
    return os.path.join(config.workdir, "model")


def train_base(config) -> str:
    """Trains the base UNet from `config` (see `configs/toy/base.py`); returns the model folder.

    The step is `training.step.make_train_step` with the whole UNet as the trainable tree and
    the VAE / text encoder frozen, fed by the same WebVid reader and grain pipeline as `train`.
    """
    from animatediff_jax import data as data_lib
    from animatediff_jax.models.clip_text import CLIPTextModel
    from animatediff_jax.models.unet import UNet3D
    from animatediff_jax.models.vae import AutoencoderKL
    from animatediff_jax.training.inputs import hash_tokenizer
    from animatediff_jax.training.step import StepSpec, init_state, loss_and_optim, make_optimizer, make_train_step

    t_start = time.perf_counter()
    d, t = config.data, config.train
    if d.source != "webvid" or d.tokenizer != "hash":
        raise ValueError("the toy base model reads a WebVid-style dataset with the hash tokenizer")
    params = init_params(int(config.model.init_seed))
    objective, optim = loss_and_optim(config)  # as the stages' program reads them
    spec = StepSpec(stage=base_stage(), unet=UNet3D(unet_config()), loss=objective, vae=AutoencoderKL(vae_config()),
                    text=CLIPTextModel(text_config()))
    tx, schedule = make_optimizer(optim)
    step = jax.jit(make_train_step(spec, tx, schedule), donate_argnums=(0,))
    state = init_state(params["unet"], tx, jax.random.key(int(config.seed)))
    frozen = {"unet": {}, "vae": params["vae"], "text_encoder": params["text_encoder"]}
    source = data_lib.WebVidSource(d.csv, d.video_folder, 1, 1, int(t.resolution), is_image=True, flip=bool(d.flip),
                                   caption_dropout=float(d.caption_dropout), seed=int(d.seed))
    pipeline = data_lib.make_dataset(source, global_batch_size=int(t.batch_size), seed=int(d.seed),
                                     shuffle=bool(d.shuffle), read_threads=int(d.read_threads),
                                     prefetch=int(d.prefetch), tokenizer=hash_tokenizer(text_config().vocab_size),
                                     shard_index=0, shard_count=1)
    it = iter(pipeline)
    steps, every = int(t.steps), max(1, int(config.log.every))
    losses, t0 = [], time.perf_counter()
    for i in range(1, steps + 1):
        batch = next(it)
        state, metrics = step(state, frozen, {k: batch[k] for k in ("video", "input_ids")})
        losses.append(metrics["loss"])
        if i == 1:
            jax.block_until_ready(metrics["loss"])
            t0 = time.perf_counter()
            print(f"[toy base] compiled; step 1 loss {float(metrics['loss']):.4f}", flush=True)
        if i % every == 0 or i == steps:
            loss = float(np.mean(jax.device_get(losses)))
            rate = (i - 1) / max(time.perf_counter() - t0, 1e-9)
            print(f"[toy base] step {i}/{steps} | loss {loss:.4f} | {rate:.2f} steps/s", flush=True)
            losses = []
    params["unet"] = jax.device_get(state.params)
    folder = model_folder(config)
    save_model(folder, params, objective.prediction_type)
    print(f"[toy base] saved {folder} ({time.perf_counter() - t_start:.0f}s)", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    from animatediff_jax.train import main as train_main

    return train_main(argv, run=train_base)


if __name__ == "__main__":
    sys.exit(main())

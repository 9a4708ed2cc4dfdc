"""The Flax VAE against diffusers' `AutoencoderKL` (seeded random weights, fp32, eval)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.checkpoints.torch_io import flax_to_torch, torch_to_flax
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig, decode_video, encode_video


def torch_vae(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL of `cfg`, with norms and biases randomised too (init leaves them 1/0)."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    vae = TorchVAE(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae


def convert(vae, model: AutoencoderKL, image_hw: int = 16):
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, image_hw, image_hw, 3)))["params"]
    return torch_to_flax(sd, target, what="vae"), sd


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny():
    cfg = VAEConfig.tiny()
    vae = torch_vae(cfg)
    model = AutoencoderKL(cfg)
    params, sd = convert(vae, model)
    return cfg, vae, model, params, sd


def test_conversion_round_trips(tiny):
    """Every diffusers key lands on one of our params and comes back unchanged."""
    _, _, _, params, sd = tiny
    back = flax_to_torch(params)  # the VAE's 1x1 convs are 4-D kernels here, so no conv1x1 hint
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_encoder_moments(tiny):
    _, vae, model, params, _ = tiny
    x = np.random.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # non-square: catches H/W mix-ups
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    with torch.no_grad():
        dist = vae.encode(nchw(x)).latent_dist
    e1 = assert_close(mean, nhwc(dist.mean), what="posterior mean")
    e2 = assert_close(logvar, nhwc(dist.logvar), what="posterior logvar")
    print(f"encoder max abs err: mean {e1:.2e}, logvar {e2:.2e}")


def test_decoder(tiny):
    _, vae, model, params, _ = tiny
    z = np.random.randn(2, 8, 6, 4).astype(np.float32)
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, z)
    with torch.no_grad():
        ref = vae.decode(nchw(z)).sample
    print(f"decoder max abs err: {assert_close(out, nhwc(ref), what='decode'):.2e}")


def test_decode_video_chunked(tiny):
    """5 frames in chunks of 2 (two mapped chunks plus a remainder) == all at once == diffusers per frame."""
    cfg, vae, model, params, _ = tiny
    b, f = 1, 5
    lat = np.random.randn(b, f, 8, 8, 4).astype(np.float32)
    chunked = decode_video(model, params, lat, chunk=2)
    whole = decode_video(model, params, lat, chunk=None)
    with torch.no_grad():
        ref = np.stack([nhwc(vae.decode(nchw(lat[0, i : i + 1] / cfg.scaling_factor)).sample)[0] for i in range(f)])
    ref = ref[None]
    e_chunk = assert_close(chunked, whole, what="chunked vs whole")
    e_ref = assert_close(chunked, ref, what="decode_video vs diffusers")
    print(f"decode_video max abs err: chunked-vs-whole {e_chunk:.2e}, vs diffusers {e_ref:.2e}")


def test_encode_video_scaling_and_sampling(tiny):
    cfg, vae, model, params, _ = tiny
    b, f = 2, 3
    frames = np.random.uniform(-1, 1, (b, f, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(nchw(frames.reshape(b * f, 16, 16, 3))).latent_dist
    mean, std = nhwc(dist.mean), nhwc(dist.std)

    lat = encode_video(model, params, frames, chunk=4)
    assert lat.shape == (b, f, 8, 8, 4)
    e_mean = assert_close(lat, (mean * cfg.scaling_factor).reshape(lat.shape), what="encode_video mean")

    keys = jax.random.split(jax.random.PRNGKey(3), b)  # one per video: its noise does not depend on the batch
    sampled = encode_video(model, params, frames, keys)
    eps = np.stack([np.asarray(jax.random.normal(k, (f, 8, 8, 4))) for k in keys])
    expect = (mean.reshape(eps.shape) + std.reshape(eps.shape) * eps) * cfg.scaling_factor
    e_sample = assert_close(sampled, expect, what="encode_video sample")
    assert np.abs(np.asarray(sampled) - np.asarray(lat)).max() > 1e-3  # the sample really differs from the mean
    print(f"encode_video max abs err: mean {e_mean:.2e}, sample {e_sample:.2e}")


def test_sd15_size_encode_decode():
    """The real SD1.5 layout (4 blocks, 512-wide mid, 32 groups) at random weights on a 16x16 image."""
    t0 = time.time()
    cfg = VAEConfig.sd15()
    vae = torch_vae(cfg, seed=1)
    model = AutoencoderKL(cfg)
    params, _ = convert(vae, model)
    x = np.random.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    mean, logvar = apply(params, x)
    z = np.random.randn(1, 2, 2, 4).astype(np.float32)
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, z)
    with torch.no_grad():
        dist = vae.encode(nchw(x)).latent_dist
        ref = vae.decode(nchw(z)).sample
    e1 = assert_close(mean, nhwc(dist.mean), what="sd15 mean")
    e2 = assert_close(logvar, nhwc(dist.logvar), what="sd15 logvar")
    e3 = assert_close(out, nhwc(ref), what="sd15 decode")
    print(f"sd15 max abs err: mean {e1:.2e}, logvar {e2:.2e}, decode {e3:.2e} ({time.time() - t0:.1f} s)")

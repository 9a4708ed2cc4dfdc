"""IP-Adapter (SD1.5) against diffusers' `AnimateDiffPipeline` with `load_ip_adapter` (PyTorch, CPU, fp32).

Tiny random models: the parity pipeline's UNet / VAE / text encoder (tests/test_parity.py), a tiny
transformers `CLIPVisionModelWithProjection` as the image encoder (`save_pretrained` folder with its PIL
image processor), and the adapters built from diffusers' own image projection modules
(`ImageProjection`, `IPAdapterPlusImageProjection`, `IPAdapterFullImageProjection`) with random
`to_k_ip` / `to_v_ip` per cross-attention, renamed to the released files' names (the inverse of diffusers'
`_convert_ip_adapter_image_proj_to_diffusers`) and loaded on both sides from those: diffusers through
`unet._load_ip_adapter_weights`, ours through `checkpoints.ip_adapter` from a `.bin` / `.safetensors`.
Motion-module GroupNorms: diffusers' semantics on both sides (see animatediff_jax/parity.py).

Compared: the latents after 3 DDIM steps with CFG from the same initial latents; tolerance
`ATOL + RTOL * max|ref|` with RTOL = 2e-5, ATOL = 1e-5 (the sampler tests' own).
"""

import dataclasses

import numpy as np
import pytest

from animatediff_jax import parity

RTOL, ATOL = 2e-5, 1e-5
F, H, W, STEPS = 4, 16, 16, 3
PROMPT, NEGATIVE, SEED = ["a cat and the dog"], ["dog"], 3


# ----------------------------------------------------------------------------------------------
# Building adapters in diffusers' modules, written in the released layout.
# ----------------------------------------------------------------------------------------------


def released_image_proj(kind: str, module) -> dict:
    """A diffusers image projection's state dict under the released files' names."""
    import re

    import torch

    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if kind == "base":
        return {k.replace("image_embeds.", "proj."): v for k, v in sd.items()}
    if kind == "full":
        rules = [("ff.net.0.proj.", "proj.0."), ("ff.net.2.", "proj.2."), ("norm.", "proj.3.")]
        out = {}
        for k, v in sd.items():
            for a, b in rules:
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            out[k] = v
        return out
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if not m:
            out[k] = v
            continue
        i, rest = m.groups()
        if rest.startswith("attn.to_v."):
            continue
        if rest.startswith("attn.to_k."):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, sd[f"layers.{i}.attn.to_v.weight"]])
            continue
        for a, b in [("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_q.", "0.to_q."),
                     ("attn.to_out.0.", "0.to_out."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
                     ("ff.1.net.2.", "1.3.")]:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        out[f"layers.{i}.{rest}"] = v
    return out


def make_adapter(kind: str, unet_config, encoder_config, seed: int) -> dict:
    """A released-layout IP-Adapter `{"image_proj": ..., "ip_adapter": ...}` (torch tensors) of random
    weights for a tiny UNet, from diffusers' modules."""
    import torch
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFullImageProjection,
        IPAdapterPlusImageProjection,
    )

    from animatediff_jax.models.ip_adapter import IPAdapterConfig as Cfg
    from animatediff_jax.models.ip_adapter import layer_shapes

    cross = unet_config.cross_attention_dim
    if kind == "base":
        module = ImageProjection(image_embed_dim=encoder_config.projection_dim, cross_attention_dim=cross,
                                 num_image_text_embeds=4)
    elif kind == "plus":  # diffusers reads heads as to_q rows // 64 and builds 4 blocks
        module = IPAdapterPlusImageProjection(embed_dims=encoder_config.hidden_size, output_dims=cross, hidden_dims=64,
                                              heads=1, num_queries=4)
    else:
        module = IPAdapterFullImageProjection(image_embed_dim=encoder_config.hidden_size, cross_attention_dim=cross)
    parity.randomize(module, seed)
    if kind == "plus":
        with torch.no_grad():
            module.latents.copy_(torch.randn(module.latents.shape, generator=torch.Generator().manual_seed(seed)))
    g = torch.Generator().manual_seed(seed + 100)
    layers = {}
    for k, shapes in enumerate(layer_shapes(Cfg(cross_attention_dim=cross), unet_config)):
        d, inner = shapes["to_k_ip"]["kernel"].shape
        for name in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * k + 1}.{name}.weight"] = torch.randn((inner, d), generator=g) * d ** -0.5
    return {"image_proj": released_image_proj(kind, module), "ip_adapter": layers}


def write_adapter(adapter: dict, path) -> str:
    """The adapter as the released files are: a `.bin` of nested dicts, or a flat prefixed `.safetensors`."""
    import torch

    path = str(path)
    if path.endswith(".bin"):
        torch.save(adapter, path)
    else:
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part, d in adapter.items() for k, v in d.items()}, path)
    return path


def smooth_images(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """Smooth uint8 images (random pixels would make every resize a lottery of rounding)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = [127.5 + 120 * np.sin(xx[..., None] / (5 + 3 * i) + yy[..., None] / (7 + i) + rng.uniform(0, 6, 3))
           for i in range(n)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Fixtures: the reference pipeline (built once), ours, the encoder.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from diffusers import AnimateDiffPipeline
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection
    from transformers import CLIPVisionConfig as HFVisionConfig

    from animatediff_jax.checkpoints.clip import load_clip
    from animatediff_jax.models.clip_vision import CLIPVisionConfig

    tmp = tmp_path_factory.mktemp("ip_adapter")
    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp))
    ours = parity.ours_from_diffusers(torch_pipe, tok)
    vision = dataclasses.replace(CLIPVisionConfig.tiny(), hidden_act="gelu")  # ViT-H/14's activation
    encoder = parity.randomize(CLIPVisionModelWithProjection(HFVisionConfig(**vision.transformers_kwargs())), 5)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp / "image_encoder"
    encoder.save_pretrained(folder)
    processor.save_pretrained(folder)
    ref = AnimateDiffPipeline(vae=torch_pipe.vae, text_encoder=torch_pipe.text_encoder, tokenizer=torch_pipe.tokenizer,
                              unet=torch_pipe.unet, motion_adapter=torch_pipe.motion_adapter,
                              scheduler=parity.diffusers_scheduler("ddim"), feature_extractor=processor,
                              image_encoder=encoder)
    ref.set_progress_bar_config(disable=True)
    return dict(ref=ref, ours=ours, clip=load_clip(folder, require="vision"), vision=vision, tmp=tmp,
                encoder_folder=str(folder))


def load_ours(env, adapter: dict, name: str):
    """Our (config, params) of `adapter`, through a written file (`.bin` for the even names, else `.safetensors`)."""
    from animatediff_jax.checkpoints.ip_adapter import load_ip_adapter

    path = write_adapter(adapter, env["tmp"] / name)
    return load_ip_adapter(path, env["ours"].unet_config)


def noise():
    import jax
    import jax.numpy as jnp

    shape = (F, H // 2, W // 2, 4)  # the tiny VAE downscales by 2
    return np.asarray(jax.random.normal(jax.random.key(SEED), shape, jnp.float32))[None]


def run_reference(env, adapters: list | None = None, **kw) -> np.ndarray:
    """diffusers' pipeline from our noise, with `adapters` loaded (None: as loaded already, scales set):
    the latents after the last step `[1, F, h, w, C]`."""
    import torch

    if adapters is not None:
        env["ref"].unet._load_ip_adapter_weights(adapters)
    captured = {}

    def on_step(p, i, t, k):
        captured["latents"] = k["latents"].detach().numpy()
        return {}

    with torch.no_grad():
        env["ref"](prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=F, height=H, width=W,
                   num_inference_steps=STEPS, guidance_scale=7.5,
                   latents=torch.from_numpy(noise().transpose(0, 4, 1, 2, 3).copy()), output_type="latent",
                   callback_on_step_end=on_step, **kw)
    return captured["latents"].transpose(0, 2, 3, 4, 1)


def run_ours(env, ip_adapters) -> np.ndarray:
    from animatediff_jax.sampling import generate

    res = generate(env["ours"], PROMPT, NEGATIVE, [SEED], num_frames=F, height=H, width=W, steps=STEPS,
                   guidance_scale=7.5, progress=False, init_latents=noise(), ip_adapters=ip_adapters)
    return res.latents


def check(name, ours, ref):
    scale = float(np.abs(ref).max())
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
    print(f"{name}: max abs {err:.2e} (ref max {scale:.3g}, tolerance {ATOL + RTOL * scale:.2e})")
    assert scale > 0 and err <= ATOL + RTOL * scale, (name, err, scale)
    return err


def pil(images):
    from PIL import Image

    return [Image.fromarray(x) for x in images]


# ----------------------------------------------------------------------------------------------
# Against diffusers.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_matches_animatediff_pipeline(env, kind):
    """One adapter from a sample config's `ip_adapter` entry (its file, a PNG, the encoder folder: read and
    loaded by `assemble`), its image encoded on both sides (diffusers' `ip_adapter_image`): base reads the
    image embedding (negative: zeros), plus the penultimate hidden states (negative: the encoder on a zero
    image). Scale 0 then runs the same compiled program, and the image mattered: far from the reference."""
    from PIL import Image

    from animatediff_jax.sampling import PROGRAMS, assemble, base_config, generate
    from animatediff_jax.sampling.config import plain

    adapter = make_adapter(kind, env["ours"].unet_config, env["vision"], seed=11 if kind == "base" else 12)
    image = smooth_images(1, 1, 40, 48)[0]  # resized and centre-cropped to 32 by the processor, both sides
    want = run_reference(env, [adapter], ip_adapter_image=pil([image])[0])

    png = env["tmp"] / f"{kind}.png"
    Image.fromarray(image).save(png)
    entry = {"path": write_adapter(adapter, env["tmp"] / ("base.bin" if kind == "base" else "plus.safetensors")),
             "image": str(png), "scale": 1.0, "encoder": env["encoder_folder"]}
    c = {**plain(base_config()), "prompt": PROMPT, "n_prompt": NEGATIVE, "seed": [SEED], "L": F, "H": H, "W": W,
         "ip_adapter": (entry,)}
    ours = env["ours"]
    req = assemble.request(c, ip_images=assemble.read_ip_images(c),
                           ip_models=assemble.load_ip_adapters(c, ours.unet_config, ours.dtype))
    (ip,) = req.ip_adapters
    assert ip.config.kind == kind and ip.name == "ip_adapter[0]"
    got = run_ours(env, [ip])
    check(f"{kind}: latents", got, want)

    compiles = PROGRAMS.compiles
    off = generate(ours, PROMPT, NEGATIVE, [SEED], num_frames=F, height=H, width=W, steps=STEPS, guidance_scale=7.5,
                   progress=False, init_latents=noise(), ip_adapters=[dataclasses.replace(ip, scale=0.0)]).latents
    assert PROGRAMS.compiles == compiles, "another scale compiled another program"
    assert np.abs(off - want).max() > 100 * (ATOL + RTOL * np.abs(want).max())


class _PerFrameTokens:
    """One adapter's projected tokens `[B, F, T, D]` (its "F images" are the frames' embeddings): what
    diffusers' `UNetMotionModel` repeats over the frames is handed over as one token set per frame instead."""

    def __init__(self, tokens):
        self.tokens, self.shape = tokens, tokens.shape

    def repeat_interleave(self, repeats, dim=0, output_size=None):
        assert dim == 0 and repeats == self.tokens.shape[1], (repeats, tuple(self.tokens.shape))
        return self.tokens.reshape((-1, 1) + tuple(self.tokens.shape[2:]))


def per_frame_projection(projection, adapters: set):
    """diffusers' `MultiIPAdapterImageProjection` whose adapters `adapters` give a token set per frame: the only
    patch of the reference (diffusers has no per-frame image prompts; its attention processors take them as is)."""
    import torch

    class PerFrame(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = projection

        def forward(self, image_embeds):
            out = self.inner(image_embeds)
            return [_PerFrameTokens(t) if j in adapters else t for j, t in enumerate(out)]

    return PerFrame()


def test_two_adapters_travel_and_block_scales_match(env):
    """Two adapters at once, from precomputed embeddings (diffusers' `ip_adapter_image_embeds`, negatives first):
    a base adapter with image travel (keyframes at frames 0 and 2 of 4: frame 1 halfway, frame 3 held), given to
    diffusers as the 4 per-frame embeddings interpolated here, and a full-face adapter on every frame with its
    own negative and a per-block scale dict (`set_ip_adapter_scale`)."""
    import torch

    from animatediff_jax.sampling import IPAdapter

    u, v = env["ours"].unet_config, env["vision"]
    a, b = make_adapter("base", u, v, 21), make_adapter("full", u, v, 22)
    rng = np.random.default_rng(4)
    keys_a = rng.standard_normal((2, v.projection_dim)).astype(np.float32)
    frames_a = np.stack([keys_a[0], (keys_a[0] + keys_a[1]) / 2, keys_a[1], keys_a[1]])[None]  # [1, F, D]
    emb_b = rng.standard_normal((1, 17, v.hidden_size)).astype(np.float32)
    neg_b = rng.standard_normal((1, 17, v.hidden_size)).astype(np.float32)
    block = {"down": {"block_0": 0.0}, "up": {"block_1": [0.5, 1.5]}, "mid": 2.0}
    ref = env["ref"]
    ref.unet._load_ip_adapter_weights([a, b])
    ref.set_ip_adapter_scale([0.7, block])
    ref.unet.encoder_hid_proj = per_frame_projection(ref.unet.encoder_hid_proj, {0})
    embeds = [torch.from_numpy(np.concatenate([np.zeros_like(frames_a), frames_a])),  # [2 (neg, pos), F, D]
              torch.from_numpy(np.stack([neg_b, emb_b]))]  # [2, 1 image, S, D]
    want = run_reference(env, ip_adapter_image_embeds=embeds)
    ca, pa = load_ours(env, a, "two_a.safetensors")
    cb, pb = load_ours(env, b, "two_b.bin")
    got = run_ours(env, [IPAdapter(ca, pa, embeds=keys_a, frames=(0, 2), scale=0.7),
                         IPAdapter(cb, pb, embeds=emb_b, negative_embeds=neg_b, scale=block)])
    check("two adapters, travel, block scales: latents", got, want)
    # ... and the travel mattered: keyframes at frames 0 and 3 instead give other latents (the same program)
    other = run_ours(env, [IPAdapter(ca, pa, embeds=keys_a, frames=(0, 3), scale=0.7),
                           IPAdapter(cb, pb, embeds=emb_b, negative_embeds=neg_b, scale=block)])
    assert np.abs(other - want).max() > 100 * (ATOL + RTOL * np.abs(want).max())


# ----------------------------------------------------------------------------------------------
# Real-size layouts (names and shapes only), errors.
# ----------------------------------------------------------------------------------------------

RELEASED = {"ip-adapter_sd15": "base", "ip-adapter_sd15_light": "base", "ip-adapter-plus_sd15": "plus",
            "ip-adapter-plus-face_sd15": "plus", "ip-adapter-full-face_sd15": "full"}


def released_layout(kind: str) -> dict:
    """The key names and shapes of a released SD1.5 file of `kind` (zero-stride arrays: nothing allocated),
    from diffusers' modules at real size on the meta device: the image projection as diffusers builds it from
    such a file, and one `IPAdapterAttnProcessor2_0` per cross-attention of SD1.5's UNet, numbered as diffusers
    numbers them (`_convert_ip_adapter_attn_to_diffusers`: 1, 3, ... over `attn_processors`, attn2 only)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFullImageProjection,
        IPAdapterPlusImageProjection,
    )

    from animatediff_jax.models.config import sd15_unet

    with torch.device("meta"):
        if kind == "base":
            proj = ImageProjection(image_embed_dim=1024, cross_attention_dim=768, num_image_text_embeds=4)
        elif kind == "plus":
            proj = IPAdapterPlusImageProjection(embed_dims=1280, output_dims=768, hidden_dims=768, heads=12,
                                                num_queries=16)
        else:
            proj = IPAdapterFullImageProjection(image_embed_dim=1280, cross_attention_dim=768)
        unet = UNet2DConditionModel(**sd15_unet().to_diffusers())
    zeros = lambda t: np.broadcast_to(np.float32(0), tuple(t.shape))
    sd = {f"image_proj.{k}": zeros(v) for k, v in released_image_proj(kind, proj).items()}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            block = name.split(".")[0]
            hidden = unet.config.block_out_channels[-1] if block == "mid_block" else (
                list(reversed(unet.config.block_out_channels)) if block == "up_blocks"
                else unet.config.block_out_channels)[int(name.split(".")[1])]
            with torch.device("meta"):
                p = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=768, num_tokens=(4,))
            for k, v in p.state_dict().items():
                sd[f"ip_adapter.{key_id}.{k.replace('.0.weight', '.weight')}"] = zeros(v)
            key_id += 2
    return sd


@pytest.mark.parametrize("file", list(RELEASED))
def test_released_layouts_at_real_size(file):
    """Each h94/IP-Adapter SD1.5 file's key layout converts strictly onto SD1.5's UNet (16 cross-attentions,
    `ip_adapter.1` .. `ip_adapter.31`), its projection giving 4 / 16 / 257 tokens of 768 (`eval_shape`)."""
    import jax

    from animatediff_jax.checkpoints.ip_adapter import convert_ip_adapter
    from animatediff_jax.models.config import sd15_unet
    from animatediff_jax.models.ip_adapter import IPAdapterConfig, image_projection

    kind = RELEASED[file]
    sd = released_layout(kind)
    assert sorted(int(k.split(".")[1]) for k in sd if k.endswith("to_k_ip.weight")) == list(range(1, 32, 2))
    config, params = convert_ip_adapter(sd, sd15_unet("v2"), what=file)
    assert config == IPAdapterConfig.sd15(kind)
    assert [p["to_k_ip"]["kernel"].shape[1] for p in params["layers"]] == \
        [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]  # down, up, mid
    x = jax.ShapeDtypeStruct((1, 257, 1280) if config.hidden_states else (1, 1024), np.float32)
    out = jax.eval_shape(image_projection(config).apply, {"params": params["image_proj"]}, x)
    assert out.shape == (1, {"base": 4, "plus": 16, "full": 257}[kind], 768)


def test_image_encoder_layout_at_real_size():
    """h94's `models/image_encoder` (OpenCLIP ViT-H/14 as transformers' `CLIPVisionModelWithProjection`): its
    config reads as ViT-H/14 (hidden 1280, 32 layers, 16 heads, MLP 5120, gelu, projection 1024, 14-pixel patches
    at 224), and every parameter of our tower at those widths is one of transformers' (name and shape; 2 of the
    32 identical layers traced, to keep this quick)."""
    import jax
    import torch
    from transformers import CLIPVisionConfig as HFVisionConfig
    from transformers import CLIPVisionModelWithProjection

    from animatediff_jax.checkpoints.torch_io import torch_key, torch_shape
    from animatediff_jax.models.clip_vision import CLIPVisionConfig
    from animatediff_jax.models.shapes import clip_vision_shapes

    h94 = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
           "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
           "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    config = CLIPVisionConfig.from_transformers(h94)
    assert config == CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16,
                                      image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    assert config.num_positions == 257  # the tokens IP-Adapter plus / full-face read
    with torch.device("meta"):
        hf = {k: v for k, v in h94.items() if k != "architectures"}
        ref = CLIPVisionModelWithProjection(HFVisionConfig(**{**hf, "num_hidden_layers": 2}))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    flat = jax.tree_util.tree_flatten_with_path(clip_vision_shapes(dataclasses.replace(config, num_layers=2)))[0]
    assert {torch_key(tuple(p.key for p in path)): torch_shape(path[-1].key, s.shape) for path, s in flat} == want


def tiny_parts():
    """A tiny UNet config (cross-attention 32, 4 cross-attentions) and encoder config, no pipeline."""
    from animatediff_jax.models.clip_vision import CLIPVisionConfig
    from animatediff_jax.models.config import tiny_unet

    return tiny_unet("v2", cross_attention_dim=32), dataclasses.replace(CLIPVisionConfig.tiny(), hidden_act="gelu")


def numpy_flat(adapter: dict) -> dict:
    return {f"{part}.{k}": v.numpy() for part, d in adapter.items() for k, v in d.items()}


def test_loader_errors_name_the_files_keys(tmp_path):
    """Files that do not fit are one `CheckpointError` naming their keys in the file's own words."""
    from animatediff_jax.checkpoints.ip_adapter import convert_ip_adapter, load_ip_adapter
    from animatediff_jax.checkpoints.torch_io import CheckpointError

    unet, vision = tiny_parts()
    base, plus = numpy_flat(make_adapter("base", unet, vision, 1)), numpy_flat(make_adapter("plus", unet, vision, 2))
    wide = numpy_flat(make_adapter("base", unet.replace(cross_attention_dim=48), vision, 3))

    def error(sd):
        with pytest.raises(CheckpointError) as e:
            convert_ip_adapter(sd, unet, what="x.bin")
        return str(e.value)

    drop = lambda sd, key: {k: v for k, v in sd.items() if k != key}
    assert "missing keys: ip_adapter.7.to_v_ip.weight (64, 32)" in error(drop(base, "ip_adapter.7.to_v_ip.weight"))
    assert "missing keys: image_proj.layers.1.0.to_kv.weight" in error(drop(plus, "image_proj.layers.1.0.to_kv.weight"))
    bad = {**base, "ip_adapter.1.to_k_ip.weight": np.zeros((32, 8), np.float32)}
    assert "ip_adapter.1.to_k_ip.weight: the file has (32, 8), the model needs (32, 32)" in error(bad)
    assert "unexpected keys: ip_adapter.9.to_k_ip.weight" in error(
        {**base, "ip_adapter.9.to_k_ip.weight": np.zeros((32, 32), np.float32)})
    assert "cross-attention width 48" in error(wide)
    face_id = {"image_proj.proj.0.weight": np.zeros((8, 4)), "image_proj.norm.weight": np.zeros(32),
               "ip_adapter.1.to_k_ip.weight": np.zeros((32, 32))}
    assert "FaceID file: not supported" in error(face_id)
    assert "not an IP-Adapter file" in error({"conv.weight": np.zeros((4, 4))})
    for message in map(error, [drop(base, "ip_adapter.7.to_v_ip.weight"), face_id, wide]):
        assert "\n" not in message, message
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"broken\.bin: (refused|cannot be read)"):
        load_ip_adapter(broken, unet)


def test_request_errors_name_the_setting():
    """An `IPAdapter`'s own settings, and what needs its model (`check_ip_adapters`), are one `FieldError` line."""
    from animatediff_jax.checkpoints.ip_adapter import convert_ip_adapter
    from animatediff_jax.errors import FieldError
    from animatediff_jax.sampling import IPAdapter, Request
    from animatediff_jax.sampling.ip_adapter import check_ip_adapters, layer_scales

    unet, vision = tiny_parts()
    config, params = convert_ip_adapter(numpy_flat(make_adapter("base", unet, vision, 1)), unet)
    img = np.zeros((8, 8, 3), np.uint8)
    emb = np.zeros((2, vision.projection_dim), np.float32)
    own = [
        (IPAdapter(None, None), "ip_adapter.image: expected one or more images"),
        (IPAdapter(None, None, (img,), embeds=emb), "ip_adapter: give images or embeds, not both"),
        (IPAdapter(None, None, (img[..., :1],)), "ip_adapter.image[0]: expected an RGB image [H, W, 3]"),
        (IPAdapter(None, None, embeds=emb, frames=(0,)), "ip_adapter.frames: 1 frame(s) for 2 image(s)"),
        (IPAdapter(None, None, embeds=emb, frames=(1, 2)), "no image at frame 0"),
        (IPAdapter(None, None, embeds=emb, frames=(0, 4)), "frame 4 is outside the video (frames 0 to 3)"),
        (IPAdapter(None, None, embeds=emb, negative_embeds=emb[:1]), "ip_adapter.negative_embeds: shape (1, 16)"),
        (IPAdapter(None, None, (img,), scale="big"), "ip_adapter.scale='big': expected a number"),
        (IPAdapter(None, None, (img,), scale={"left": 1}), "ip_adapter.scale: unknown part(s) ['left']"),
        (IPAdapter(None, None, (img,), scale={"up": {"b1": 1}}), "ip_adapter.scale.up: key 'b1': expected block_<i>"),
        (IPAdapter(None, None, (img,), interpolation="cubic"), "ip_adapter.interpolation='cubic'"),
    ]
    for a, message in own:
        with pytest.raises(FieldError) as e:
            Request.create(["a cat"], None, [0], num_frames=4, ip_adapters=[a])
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    loaded = [
        (IPAdapter(None, None, (img,)), "ip_adapter: its model is not loaded"),
        (IPAdapter(config, params, (img,)), "ip_adapter.encoder: an image encoder"),
        (IPAdapter(config, params, embeds=np.zeros((1, 8), np.float32)),
         "ip_adapter.embeds: this adapter reads image embeddings [K, D] with D = 16, got (1, 8)"),
        (IPAdapter(config, params, embeds=emb, scale={"down": {"block_1": 1.0}}),
         "ip_adapter.scale.down: block_1 has no attentions (blocks with attentions: block_0)"),
        (IPAdapter(config, params, embeds=emb, scale={"up": {"block_1": [1.0, 2.0, 3.0]}}),
         "ip_adapter.scale.up.block_1=[1.0, 2.0, 3.0]: expected 2 scales"),
        (IPAdapter(config, {**params, "layers": params["layers"][:3]}, embeds=emb), "an adapter for another UNet"),
    ]
    for a, message in loaded:
        with pytest.raises(FieldError) as e:
            check_ip_adapters([a], unet)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    # diffusers' per-block expansion: the blocks a dict leaves out get 0 (order: down, up, mid)
    assert layer_scales(unet, {"up": {"block_1": [0.5, 1.5]}, "mid": [2.0]}) == [0.0, 0.5, 1.5, 2.0]
    assert layer_scales(unet, {"down": 0.3}) == [0.3, 0.0, 0.0, 0.0] and layer_scales(unet, 0.6) == [0.6] * 4


def test_config_errors_are_one_line(tmp_path):
    """`ip_adapter` entries are checked with the config, before anything loads: one line naming the field; the
    files every entry names (the encoder folder by default beside the adapter file) listed when missing."""
    from animatediff_jax.errors import ConfigError
    from animatediff_jax.sampling.assemble import validate

    base = {"prompt": ("a cat",), "L": 4, "H": 64, "W": 64}
    ok = {"path": "m/ip-adapter_sd15.bin", "image": "cat.png"}
    cases = [
        ({"path": "m/a.bin"}, "ip_adapter[0].image: required"),
        ({**ok, "weight": 1.0}, "ip_adapter[0]={"),
        ({**ok, "image": {"2": "a.png"}}, "ip_adapter[0].image: no image at frame 0 (keyframes [2])"),
        ({**ok, "image": {0: "a.png", 9: "b.png"}}, "ip_adapter[0].image: frame 9 is outside the video"),
        ({**ok, "image": {"x": "a.png"}}, "ip_adapter[0].image: key 'x' is not a frame number"),
        ({**ok, "image": 3}, "ip_adapter[0].image=3: expected an image file"),
        ({**ok, "scale": "big"}, "ip_adapter[0].scale='big': expected a number"),
        ({**ok, "scale": {"mid": [1.0, 2.0]}}, None),  # (the UNet's blocks: checked with the model, below)
        ({**ok, "interpolation": "cubic"}, "ip_adapter[0].interpolation='cubic'"),
        ({**ok, "encoder": 3}, "ip_adapter[0].encoder=3: expected a folder"),
    ]
    for entry, message in cases:
        c = {**base, "ip_adapter": (entry,)}
        if message is None:
            validate(c, files=False)
            continue
        with pytest.raises(ConfigError) as e:
            validate(c, files=False)
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    with pytest.raises(ConfigError) as e:
        validate({**base, "ip_adapter": {"path": "a.bin", "image": "b.png"}}, files=False)
    assert "ip_adapter=" in str(e.value) and "expected a tuple" in str(e.value)
    with pytest.raises(ConfigError) as e:  # every missing file, in one line
        validate({**base, "base_model": str(tmp_path), "ip_adapter": (ok, {**ok, "encoder": "enc"})})
    msg = str(e.value)
    for field in ("ip_adapter[0].path: m/ip-adapter_sd15.bin", "ip_adapter[0].image[0]: cat.png",
                  "ip_adapter[0].encoder: m/image_encoder", "ip_adapter[1].encoder: enc"):
        assert field in msg and "\n" not in msg, (field, msg)


def test_compile_sample_lowers_with_ip_adapters():
    """`animatediff-jax compile sample`'s denoising program with IP-Adapters, from the config alone: the
    layouts the file names say (`compile.abstract_ip_adapters`), tokens and weights as `ShapeDtypeStruct`s,
    image travel per frame; it lowers (a tiny abstract pipeline, on this CPU)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from animatediff_jax.compile import abstract_ip_adapters
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.shapes import clip_shapes, unet_shapes, vae_shapes
    from animatediff_jax.models.vae import VAEConfig
    from animatediff_jax.sampling import AnimationPipeline, assemble, base_config
    from animatediff_jax.sampling.config import plain
    from animatediff_jax.sampling.programs import abstract_sampler

    unet, _ = tiny_parts()
    vae, text = VAEConfig.tiny(), CLIPTextConfig.tiny()
    sds = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), tree)
    pipe = AnimationPipeline(unet, vae, text, {"unet": sds(unet_shapes(unet)), "vae": sds(vae_shapes(vae)),
                                               "text_encoder": sds(clip_shapes(text))})
    c = {**plain(base_config()), "prompt": ["a cat"], "seed": [0], "L": 4, "H": 16, "W": 16, "steps": 2,
         "ip_adapter": ({"path": "m/ip-adapter-plus-face_sd15.bin", "image": {0: "a.png", "2": "b.png"}},
                                {"path": "m/ip-adapter-full-face_sd15.safetensors", "image": "c.png", "scale": 0.5})}
    models = abstract_ip_adapters(c, pipe)
    assert [m[0].kind for m in models] == ["plus", "full"]
    request = assemble.request(c, ip_models=models)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    fn, args, sharding = abstract_sampler(pipe, request, mesh)["denoise"]
    images = args[11]  # (after SDXL's added conditioning, None here)
    assert [t.shape for t in images.cond] == [(4, 16, 768), (257, 768)] and images.scales.shape == (2, 4)
    with jax.set_mesh(mesh):
        jax.jit(fn, out_shardings=sharding).lower(*args)

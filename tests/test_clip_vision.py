"""CLIP vision tower, projections, preprocessing and loaders against transformers (CPU, fp32).

Tolerances: tiny models 1e-5 (abs, + 1e-5 x the reference's max); ViT-L/14 at batch 1 2e-5 x max;
preprocessing exact (0) against transformers' PIL backend.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image

from animatediff_jax.checkpoints.clip import convert_clip, load_clip
from animatediff_jax.checkpoints.torch_io import CheckpointError, load_state_dict, save_state_dict
from animatediff_jax.models.clip_text import CLIPTextConfig, pool_eos, text_embeddings
from animatediff_jax.models.clip_vision import (
    CLIPVision,
    CLIPVisionConfig,
    CLIPVisionWithProjection,
    image_embeddings,
)
from animatediff_jax.models.image_preprocess import ImageProcessing, pil_resize, preprocess

VIS = CLIPVisionConfig.tiny()
TXT = CLIPTextConfig.tiny()
PROJ = VIS.projection_dim
BOS, EOS = TXT.vocab_size - 2, TXT.vocab_size - 1


def randomize(model, seed: int = 0):
    """Every parameter random (layer norms around 1), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if ("norm" in name and name.endswith("weight")) else 0.2 * noise)
    return model.eval()


def hf_text_kwargs(eos: int = EOS) -> dict:
    return dict(**TXT.transformers_kwargs(), projection_dim=PROJ, bos_token_id=BOS, eos_token_id=eos, pad_token_id=eos)


def tiny_processor_kwargs() -> dict:
    return dict(size={"shortest_edge": VIS.image_size}, crop_size={"height": VIS.image_size, "width": VIS.image_size})


def token_ids(rng, lengths, total: int = TXT.max_positions) -> np.ndarray:
    ids = np.full((len(lengths), total), EOS, np.int64)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = rng.integers(0, BOS, n)
    return ids


def frames(rng, n: int, h: int, w: int) -> np.ndarray:
    """Smooth uint8 frames (random images would make every resize a lottery of rounding)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = [127.5 + 120 * np.sin(xx[..., None] / (5 + 3 * i) + yy[..., None] / (7 + i) + rng.uniform(0, 6, 3))
           for i in range(n)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def to_torch_pixels(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A transformers-5 `save_pretrained` tiny CLIPModel with its processor settings."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    cfg = CLIPConfig(text_config=hf_text_kwargs(), vision_config=VIS.transformers_kwargs(), projection_dim=PROJ)
    model = randomize(CLIPModel(cfg), seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(d)
    CLIPImageProcessorPil(**tiny_processor_kwargs()).save_pretrained(d)
    return model, str(d)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_clip_image_processor_exactly():
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # non-square, landscape: 224x336 then crop
    tall = rng.integers(0, 256, (301, 203, 3), dtype=np.uint8)  # odd sizes: the crop offsets' rounding
    for x in (img, tall):
        want = CLIPImageProcessorPil()(Image.fromarray(x), return_tensors="np")["pixel_values"][0]
        got = np.asarray(preprocess(x[None]))[0].transpose(2, 0, 1)
        assert got.shape == want.shape == (3, 224, 224)
        assert np.abs(got - want).max() == 0.0, "not bit-exact against the PIL backend"
    # float input in [0, 1] is made uint8 by round(x * 255), as diffusers' numpy_to_pil
    assert np.array_equal(np.asarray(preprocess(img[None] / 255.0)), np.asarray(preprocess(img[None])))
    # What CLIPImageProcessor resolves to here: the PIL backend without torchvision (exact); with it,
    # torch's uint8 antialiased resize, which differs from Pillow by one level at ~0.5% of pixels.
    proc = CLIPImageProcessor()
    want = proc(Image.fromarray(img), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    err = np.abs(np.asarray(preprocess(img[None]))[0] - want)
    if getattr(proc, "backend", "pil") == "pil":
        assert err.max() == 0.0
    else:
        assert err.max() <= 0.031 and err.mean() < 1e-3


def test_resize_equals_pillow_up_and_down_bilinear_and_bicubic():
    """Bit-exact, both pass orders: 37x90 -> 17x201 shrinks the height by more than twice the width
    (Pillow >= 13 runs the vertical pass first; older Pillow always the horizontal one)."""
    import PIL

    pillow13 = int(PIL.__version__.split(".")[0]) >= 13
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (37, 90, 3), dtype=np.uint8)
    for h, w in ((17, 201), (100, 30), (60, 45)):
        for resample in (2, 3):
            want = np.asarray(Image.fromarray(img).resize((w, h), resample=resample))
            order = None if pillow13 else False
            got = np.asarray(pil_resize(img[None], h, w, resample, vertical_first=order))[0]
            assert np.array_equal(got, want), (h, w, resample)


def test_processor_settings_old_and_new_style():
    old = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}  # SD1.5's feature_extractor
    assert ImageProcessing.from_preprocessor_config(old) == ImageProcessing()
    new = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    assert ImageProcessing.from_preprocessor_config(new) == ImageProcessing.for_image_size(336)
    with pytest.raises(ValueError, match="lanczos"):
        ImageProcessing.from_preprocessor_config({"resample": 1})


# ----------------------------------------------------------------------------- towers vs transformers


def test_tiny_vision_with_projection_matches_transformers(tmp_path):
    """Loaded from a transformers-4-style folder (position_ids buffer), compared on every output."""
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModelWithProjection as HFModel

    ref = randomize(HFModel(HFConfig(**VIS.transformers_kwargs())), seed=2)
    ref.save_pretrained(tmp_path)
    sd = load_state_dict(tmp_path / "model.safetensors")
    sd["vision_model.embeddings.position_ids"] = np.arange(VIS.num_positions)[None]
    save_state_dict(tmp_path / "model.safetensors", sd)
    clip = load_clip(tmp_path, require="vision")
    assert clip.kind == "CLIPVisionModelWithProjection" and clip.text_config is None and clip.vision_config == VIS

    x = np.random.default_rng(0).standard_normal((3, VIS.image_size, VIS.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(to_torch_pixels(x))
    model = clip.vision_model()
    got = model.apply({"params": clip.params["vision"]}, jnp.asarray(x))
    assert_close(got, out.image_embeds.numpy(), what="image_embeds")
    hidden, pooled = CLIPVision(VIS).apply({"params": clip.params["vision"]["vision_model"]}, jnp.asarray(x))
    assert_close(hidden, out.last_hidden_state.numpy(), what="last_hidden_state")
    with torch.no_grad():
        want_pooled = ref.vision_model(to_torch_pixels(x)).pooler_output.numpy()
    assert_close(pooled, want_pooled, what="pooled")


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_tiny_text_with_projection_matches_transformers(tmp_path, legacy_eos):
    """EOS pooling: the first eos id, or (configs with eos_token_id 2) the largest id of the row."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection as HFModel

    ref = randomize(HFModel(HFConfig(**hf_text_kwargs(eos=2 if legacy_eos else EOS))), seed=3)
    ref.save_pretrained(tmp_path)
    clip = load_clip(tmp_path, require=("text",))
    assert clip.kind == "CLIPTextModelWithProjection" and clip.eos_token_id == (2 if legacy_eos else EOS)
    rng = np.random.default_rng(1)
    ids = token_ids(rng, [3, 20, 0])
    ids[1, 5] = EOS - 3  # an id above the others before the eos: the rules differ only on such rows
    if not legacy_eos:
        ids[2, 1:] = rng.integers(0, BOS, ids.shape[1] - 1)
        ids[2, 40] = EOS  # one eos mid-row: pooled there, not at the row's end
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).text_embeds.numpy()
    got = clip.text_model().apply({"params": clip.params["text"]}, jnp.asarray(ids, jnp.int32))
    assert_close(got, want, what="text_embeds")
    norm = text_embeddings(clip.text_model(), clip.params["text"], ids)
    assert_close(norm, want / np.linalg.norm(want, axis=-1, keepdims=True), what="normalised text_embeds")


def test_pool_eos_rules():
    h = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
    ids = jnp.array([[5, 9, 7, 7], [5, 7, 9, 7]])
    assert pool_eos(h, ids, 7)[:, 0].tolist() == [2.0, 5.0]  # first 7
    assert pool_eos(h, ids, 2)[:, 0].tolist() == [1.0, 6.0]  # legacy: argmax of ids


def test_tiny_clip_model_matches_transformers_end_to_end(clip_folder):
    """uint8 frames -> image embeddings and token ids -> text embeddings, as CLIPImageProcessor +
    CLIPModel do it (logits too)."""
    from transformers import CLIPImageProcessorPil

    ref, folder = clip_folder
    clip = load_clip(folder, require=("vision", "text"))
    assert clip.kind == "CLIPModel" and clip.vision_config == VIS and clip.text_config == TXT
    assert clip.processor == ImageProcessing.for_image_size(VIS.image_size)
    assert clip.logit_scale == pytest.approx(2.0)

    rng = np.random.default_rng(2)
    imgs = frames(rng, 3, 30, 45)
    ids = token_ids(rng, [4, 9, 1])
    pixels = CLIPImageProcessorPil(**tiny_processor_kwargs())([Image.fromarray(f) for f in imgs], return_tensors="pt")
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), pixel_values=pixels["pixel_values"])
    img = image_embeddings(clip.vision_model(), clip.params["vision"], imgs, clip.processor)
    txt = text_embeddings(clip.text_model(), clip.params["text"], ids)
    assert_close(img, out.image_embeds.numpy(), what="image_embeds")
    assert_close(txt, out.text_embeds.numpy(), what="text_embeds")
    logits = np.exp(clip.logit_scale) * np.asarray(img) @ np.asarray(txt).T
    assert_close(logits, out.logits_per_image.numpy(), what="logits_per_image")


def test_vit_l14_architecture_matches_transformers():
    """The real ViT-L/14 shape (24 layers, 1024 wide, 16 heads, 257 tokens), random weights, batch 1."""
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModelWithProjection as HFModel

    cfg = CLIPVisionConfig.vit_l14()
    with torch.device("meta"):  # weights from numpy below: torch's own init of 300M params is slow here
        ref = HFModel(HFConfig(**cfg.transformers_kwargs()))
    rng = np.random.default_rng(0)
    sd = {}
    for name, p in ref.named_parameters():
        a = rng.random(tuple(p.shape), dtype=np.float32) - 0.5
        a *= 0.1 if p.ndim > 1 else 1.0
        sd[name] = a + 1.0 if ("norm" in name and name.endswith("weight")) else a
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, assign=True, strict=False)
    ref.vision_model.embeddings.position_ids = torch.arange(cfg.num_positions)[None]
    ref.eval()
    params, _ = convert_clip(sd, vision=cfg, what="ViT-L/14")
    x = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    with torch.inference_mode():
        want = ref(to_torch_pixels(x)).image_embeds.numpy()
    del ref, sd
    got = CLIPVisionWithProjection(cfg).apply({"params": params["vision"]}, jnp.asarray(x))  # eager: no compile
    assert_close(got, want, rtol=2e-5, atol=0, what="ViT-L/14 image_embeds")


def test_vision_config_from_clip_config_uses_top_level_projection():
    # SD1.5's safety_checker/config.json style: vision_config + legacy vision_config_dict, sub-config projection 512
    cfg = {"model_type": "clip", "projection_dim": 768,
           "vision_config": {"hidden_size": 768, "patch_size": 32, "projection_dim": 512},
           "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14}}
    assert CLIPVisionConfig.from_transformers(cfg) == CLIPVisionConfig.vit_l14()
    b32 = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
           "patch_size": 32, "projection_dim": 512, "image_size": 224}
    assert CLIPVisionConfig.from_transformers(b32) == CLIPVisionConfig.vit_b32()


# ----------------------------------------------------------------------------- loader errors


def test_missing_and_unexpected_keys_are_named(clip_folder, tmp_path):
    _, folder = clip_folder
    sd = load_state_dict(os.path.join(folder, "model.safetensors"))
    gone = sd.pop("visual_projection.weight")
    sd["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    for name in ("config.json", "preprocessor_config.json"):
        with open(os.path.join(folder, name)) as f, open(tmp_path / name, "w") as g:
            g.write(f.read())
    save_state_dict(tmp_path / "model.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load_clip(tmp_path)
    msg = str(e.value)
    # Both sides in the file's words: its key names, the missing one with its PyTorch shape.
    assert f"missing keys: visual_projection.weight {tuple(gone.shape)}" in msg and "unexpected keys: vision_model.extra_head.weight" in msg


def test_wrong_kind_folders_say_what_they_are(tmp_path):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text = tmp_path / "text"
    CLIPTextModelWithProjection(HFConfig(**hf_text_kwargs())).save_pretrained(text)
    with pytest.raises(CheckpointError, match=r"text tower only\), but a vision tower is needed") as e:
        load_clip(text, require="vision")
    assert str(text) in str(e.value) and "\n" not in str(e.value)

    encoder = tmp_path / "text_encoder"  # SD1.5's text_encoder/: no projection
    CLIPTextModel(HFConfig(**TXT.transformers_kwargs())).save_pretrained(encoder)
    with pytest.raises(CheckpointError, match="a CLIPTextModel folder"):
        load_clip(encoder)

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    with pytest.raises(CheckpointError, match=r"unet: a diffusers UNet2DConditionModel folder, not a CLIP model"):
        load_clip(unet)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_clip(tmp_path / "nowhere")

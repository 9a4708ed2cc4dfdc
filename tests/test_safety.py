"""The safety checker against diffusers' `StableDiffusionSafetyChecker` (tiny CLIPConfig, random
weights, CPU fp32): same flags, same blacked images; its loader at the released and the
transformers-5 key layouts. Flags are compared exactly (they are decisions); cosines to 1e-5."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image

from animatediff_jax.checkpoints.clip import load_clip, load_safety_checker
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.models.clip_vision import CLIPVisionConfig
from animatediff_jax.models.image_preprocess import ImageProcessing
from animatediff_jax.models.safety import check_images, safety_result, safety_scores

VIS = CLIPVisionConfig.tiny()
PROJ = VIS.projection_dim
SIZE = VIS.image_size


def hf_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=VIS.transformers_kwargs(), projection_dim=PROJ)


def frames(n: int, h: int = 40, w: int = 56) -> np.ndarray:
    """Smooth, distinct float images in [0, 1] (what a pipeline decodes)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    out = [0.5 + 0.45 * np.sin(xx[..., None] / (3 + 2 * i) - yy[..., None] / (4 + 3 * i) + rng.uniform(0, 6, 3))
           for i in range(n)]
    return np.stack(out).astype(np.float32)


def numpy_to_pil(images: np.ndarray) -> list:
    """diffusers' `VaeImageProcessor.numpy_to_pil`."""
    return [Image.fromarray(x) for x in (images * 255).round().astype("uint8")]


def clip_input(images: np.ndarray) -> torch.Tensor:
    """What `StableDiffusionPipeline.run_safety_checker` feeds the checker (SD1.5's feature_extractor at our size)."""
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return proc(numpy_to_pil(images), return_tensors="pt")["pixel_values"]


def orthogonal_part(e: np.ndarray, i: int) -> np.ndarray:
    """The part of `e[i]` orthogonal to every other row: cosine |part| with row i, 0 with the others."""
    others = np.delete(e, i, axis=0).T
    coef = np.linalg.lstsq(others, e[i], rcond=None)[0]
    return e[i] - others @ coef


@pytest.fixture(scope="module")
def checker():
    """diffusers' checker with random tower weights and concepts set so that, of 4 images:
    0 is flagged directly, 1 only through the special-care +0.01 adjustment, 2 has a special-care
    hit but no concept within reach of it, 3 is clean."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(0)
    model = StableDiffusionSafetyChecker(hf_config()).eval()
    with torch.no_grad():
        for name, p in list(model.vision_model.named_parameters()) + list(model.visual_projection.named_parameters()):
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if ("norm" in name and name.endswith("weight")) else 0.2 * noise)
    images = frames(4)
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(clip_input(images))[1]).numpy().astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    parts = [orthogonal_part(e, i) for i in range(4)]
    reach = [np.linalg.norm(p) for p in parts]
    assert min(reach[:3]) > 0.08, f"image embeddings too collinear for the test's margins: {reach}"
    rng = np.random.default_rng(1)
    concept = rng.standard_normal((17, PROJ))
    concept_w = np.ones(17)  # a cosine never exceeds 1: these concepts never fire
    special = rng.standard_normal((3, PROJ))
    special_w = np.ones(3)
    concept[0], concept_w[0] = parts[0], reach[0] - 0.05  # image 0: +0.05
    special[0], special_w[0] = parts[1], reach[1] - 0.05  # image 1: special care ...
    concept[1], concept_w[1] = parts[1], reach[1] + 0.005  # ... -0.005 + 0.01 > 0: flagged
    special[1], special_w[1] = parts[2], reach[2] - 0.05  # image 2: special care ...
    concept[2], concept_w[2] = parts[2], reach[2] + 0.02  # ... -0.02 + 0.01 < 0: not flagged
    with torch.no_grad():
        for name, v in (("concept_embeds", concept), ("concept_embeds_weights", concept_w),
                        ("special_care_embeds", special), ("special_care_embeds_weights", special_w)):
            getattr(model, name).copy_(torch.from_numpy(v.astype(np.float32)))
    return model, images


def save_folder(model, root, *, released: bool, weights: str = "model.safetensors") -> str:
    """An SD1.5-style pipeline folder: `safety_checker/` (+ `feature_extractor/`, `model_index.json`).
    `released`: SD1.5's file naming (`vision_model.vision_model.*`, an int64 position_ids [1, 17] buffer)."""
    from animatediff_jax.checkpoints.torch_io import save_state_dict

    folder = os.path.join(root, "safety_checker")
    model.save_pretrained(folder)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if released:
        sd = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in sd.items()}
        sd["vision_model.vision_model.embeddings.position_ids"] = np.arange(VIS.num_positions)[None]
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".bin")):
            os.remove(os.path.join(folder, name))
    save_state_dict(os.path.join(folder, weights), sd)
    os.makedirs(os.path.join(root, "feature_extractor"), exist_ok=True)
    with open(os.path.join(root, "feature_extractor", "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": SIZE,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}, f)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


@pytest.mark.parametrize("released", [True, False], ids=["released-naming", "transformers5-naming"])
def test_flags_and_black_images_match_diffusers(checker, tmp_path, released):
    model, images = checker
    save_folder(model, tmp_path, released=released, weights="pytorch_model.bin" if released else "model.safetensors")
    sc = load_safety_checker(tmp_path)  # the pipeline folder: its safety_checker/ and feature_extractor/
    assert sc.config == VIS and sc.processor == ImageProcessing.for_image_size(SIZE)

    with torch.no_grad():
        want_images, want_flags = model(clip_input=clip_input(images), images=images.copy())
    assert want_flags == [True, True, False, False]  # the fixture's design, in diffusers' own terms
    got_images, got_flags = check_images(sc.params, images, config=sc.config, processing=sc.processor)
    assert np.asarray(got_flags).tolist() == want_flags
    assert np.asarray(got_images).dtype == images.dtype
    np.testing.assert_array_equal(np.asarray(got_images), want_images)
    # uint8 frames give the same decisions (the checker sees round(x * 255) either way)
    u8 = (images * 255).round().astype(np.uint8)
    blacked, flags = check_images(sc.params, u8, config=sc.config, processing=sc.processor)
    assert np.asarray(flags).tolist() == want_flags
    assert not np.asarray(blacked)[:2].any() and np.array_equal(np.asarray(blacked)[2:], u8[2:])

    res = safety_result(sc.params, images, config=sc.config, processing=sc.processor)
    assert np.asarray(res["special_care"]).any(axis=1).tolist() == [False, True, True, False]
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(clip_input(images))[1]).numpy()
    assert_close(res["image_embeds"], emb, what="image_embeds")


def test_rounding_and_special_care_order_match_diffusers_loop(monkeypatch):
    """Cosines placed on the 3-decimal rounding edges, fed to diffusers' own loop (its
    `cosine_distance` patched to return them) and to `safety_scores`."""
    import diffusers.pipelines.stable_diffusion.safety_checker as sc_mod

    w = 0.5
    rows = [  # (special cosines, first concept cosine)
        ([0.0, 0.0, 0.0], w + 0.0004),   # rounds to 0.0: not flagged
        ([0.0, 0.0, 0.0], w + 0.0005),   # float32 0.5005 - 0.5 rounds half-even / below: diffusers decides
        ([0.0, 0.0, 0.0], w + 0.0006),   # 0.001 > 0: flagged
        ([w + 0.001, 0.0, 0.0], w - 0.0094),  # special care: -0.0094 + 0.01 -> 0.001: flagged
        ([w + 0.001, 0.0, 0.0], w - 0.0096),  # -0.0096 + 0.01 -> 0.0 (0.0004): not flagged
        ([w + 0.0004, 0.0, 0.0], w - 0.009),  # special score rounds to 0: no adjustment, not flagged
        ([w - 0.0095, w + 0.002, 0.0], w - 0.0099),  # second special positive: adjustment, 0.0001 -> 0
        ([w - 0.0095, w + 0.002, w - 0.0099], w - 0.0094),  # flagged; third special gets +0.01 (0.0001)
    ]
    special = np.array([r[0] for r in rows], np.float32)
    concept = np.zeros((len(rows), 17), np.float32)
    concept[:, 0] = [r[1] for r in rows]
    n = len(rows)

    def fake_cosine(image_embeds, embeds):
        return torch.from_numpy(special if embeds.shape[0] == 3 else concept)

    monkeypatch.setattr(sc_mod, "cosine_distance", fake_cosine)
    model = sc_mod.StableDiffusionSafetyChecker(hf_config()).eval()
    with torch.no_grad():
        model.concept_embeds_weights.fill_(1.0)
        model.concept_embeds_weights[0] = w
        model.special_care_embeds_weights.fill_(w)
        _, want = model(clip_input=torch.zeros(n, 3, SIZE, SIZE), images=np.zeros((n, 2, 2, 3)))
    got = safety_scores(special, concept, model.special_care_embeds_weights.numpy(), model.concept_embeds_weights.numpy())
    assert np.asarray(got["has_nsfw"]).tolist() == want
    assert want[:5] == [False, want[1], True, True, False] and want[5] is False


# ----------------------------------------------------------------------------- loader errors


def test_missing_and_unexpected_keys_are_named(checker, tmp_path):
    from animatediff_jax.checkpoints.torch_io import load_state_dict, save_state_dict

    model, _ = checker
    folder = save_folder(model, tmp_path, released=True)
    path = os.path.join(folder, "model.safetensors")
    sd = load_state_dict(path)
    gone = sd.pop("concept_embeds")
    sd["vision_model.vision_model.extra.weight"] = np.zeros((2, 2), np.float32)
    save_state_dict(path, sd)
    with pytest.raises(CheckpointError) as e:
        load_safety_checker(folder)
    msg = str(e.value)
    assert path in msg and f"missing keys: concept_embeds {tuple(gone.shape)}" in msg
    assert "unexpected keys: vision_model.vision_model.extra.weight" in msg

    sd["concept_embeds"] = np.zeros((17, PROJ), np.float32)
    del sd["vision_model.vision_model.extra.weight"]
    sd["vision_model.vision_model.embeddings.position_ids"] = np.arange(1, VIS.num_positions + 1)[None]
    save_state_dict(path, sd)
    with pytest.raises(CheckpointError, match=r"position_ids \(1, 17\) is not arange\(17\)"):
        load_safety_checker(folder)


def test_wrong_kind_folders_say_what_they_are(checker, tmp_path):
    from transformers import CLIPModel

    model, _ = checker
    clip = tmp_path / "clip"
    CLIPModel(hf_config()).save_pretrained(clip)
    with pytest.raises(CheckpointError, match=r"clip: a CLIPModel folder, not an SD safety checker folder"):
        load_safety_checker(clip)
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="a diffusers UNet2DConditionModel folder, not an SD safety checker"):
        load_safety_checker(unet)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="a diffusers pipeline folder"):
        load_safety_checker(pipe)
    folder = save_folder(model, tmp_path / "sd", released=False)
    with pytest.raises(CheckpointError, match="an SD safety checker folder .*load_safety_checker.*, not a CLIP model"):
        load_clip(folder)

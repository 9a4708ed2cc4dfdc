"""A whole SDXL base from the files users have, by values: a diffusers folder written by diffusers' own
`StableDiffusionXLPipeline.save_pretrained` (tiny, random) and the same model as an SGM single file
(`sd_xl_base_1.0.safetensors` layout, written by `ldm_fixture` and `test_sdxl_text.to_open_clip`, both
independent of the loaders) -> `load_sdxl` -> UNet, VAE and prompt encoding equal diffusers'. The real
SDXL UNet's single-file layout is checked on shapes alone; SD1.5 and SDXL files handed to the other's
loader are one clear line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict
from ldm_fixture import diffusers_to_ldm
from test_sdxl_text import G_PREFIX, L_PREFIX, PROMPTS, TINY_G, TINY_L, hf_text, to_open_clip
from test_sdxl_unet import FRAMES, SDXL_BASE_CONFIG, _Shape, inputs, ours
from torch_refs import randomize, unet2d_kwargs

from animatediff_jax.checkpoints import family, sd15, sdxl, torch_io
from animatediff_jax.checkpoints.torch_io import CheckpointError, save_state_dict
from animatediff_jax.models.config import sdxl_unet, tiny_sdxl_unet, tiny_unet
from animatediff_jax.models.shapes import unet_shapes
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig
from animatediff_jax.testing.tiny import write_tiny_tokenizer
from animatediff_jax.text import Tokenizer, encode_prompts_sdxl

# The tiny SDXL: its UNet attends to both towers' hidden states (32 + 48) and takes the pooled bigG-like
# output (40) + 6 time ids x 8 as its added embedding; its VAE has SDXL's scaling factor.
UCFG = tiny_sdxl_unet(None, cross_attention_dim=TINY_L.hidden_size + TINY_G.hidden_size,
                      projection_class_embeddings_input_dim=TINY_G.projection_dim + 6 * 8)
VCFG = dataclasses.replace(VAEConfig.tiny(), scaling_factor=0.13025)


def np_sd(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(diffusers `StableDiffusionXLPipeline` of tiny random models, the folder its `save_pretrained` wrote)."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    vocab = write_tiny_tokenizer(str(root / "tok"))
    write_tiny_tokenizer(str(root / "tok_2"), pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=randomize(TorchVAE(**VCFG.to_diffusers()), 21),
        text_encoder=hf_text(TINY_L, vocab, 2, seed=22), text_encoder_2=hf_text(TINY_G, vocab, 2, seed=23),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tok"), local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "tok_2"), local_files_only=True),
        unet=randomize(UNet2DConditionModel(**unet2d_kwargs(UCFG)), 24), scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


@pytest.fixture(scope="module")
def from_folder(saved):
    return sdxl.load_sdxl(saved[1])


def sgm_state_dict(pipe, parts=("unet", "vae", "text")) -> dict[str, np.ndarray]:
    """The pipeline's models in the released single-file layout, with the buffers those files carry."""
    sd = diffusers_to_ldm(np_sd(pipe.unet) if "unet" in parts else None, np_sd(pipe.vae) if "vae" in parts else None,
                          None, UCFG, VCFG)
    if "text" in parts:
        sd.update({L_PREFIX + "text_model." + k: v for k, v in np_sd(pipe.text_encoder).items()})
        sd[L_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77)[None]
        sd.update(to_open_clip(np_sd(pipe.text_encoder_2)))  # (+ logit_scale)
    return sd


def assert_same_params(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------------ the folder


def test_vae_config_is_data():
    """SDXL's VAE is SD1.5's architecture with another scaling factor, read from `vae/config.json`."""
    released = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
                "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
                "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert VAEConfig.from_diffusers(released) == VAEConfig.sdxl()
    assert VAEConfig.sdxl() == dataclasses.replace(VAEConfig.sd15(), scaling_factor=0.13025)


def test_diffusers_folder_matches_diffusers(saved, from_folder):
    """`save_pretrained`'s folder -> `load_sdxl`: configs as saved; UNet (with added_cond), VAE (decode,
    and encode-mean-decode) and `encode_prompts_sdxl` (tokenizers from the folder) equal diffusers' (fp32)."""
    pipe, folder = saved
    m = from_folder
    assert (m.unet_config, m.vae_config, m.text_config, m.text_config_2) == (UCFG, VCFG, TINY_L, TINY_G)
    assert m.vae_config.scaling_factor == 0.13025 and m.eos_token_id_2 == 2 and m.force_zeros_for_empty_prompt
    assert set(m.params) == set(sdxl.SDXL_PARTS)
    assert m.tokenizer_2_path == str(folder / "tokenizer_2")
    errs = {}

    x, t, ctx, text, ids = inputs(UCFG)
    frames = x.permute(0, 2, 1, 3, 4).reshape(2 * FRAMES, UCFG.in_channels, 8, 8)
    per_frame = lambda v: v.repeat_interleave(FRAMES, 0)
    with torch.no_grad():
        ref = pipe.unet(frames, per_frame(t), per_frame(ctx),
                        added_cond_kwargs={"text_embeds": per_frame(text), "time_ids": per_frame(ids)}).sample
    ref = ref.reshape(2, FRAMES, UCFG.out_channels, 8, 8).permute(0, 2, 1, 3, 4).numpy()
    errs["unet"] = assert_close(ours(UCFG, m.params["unet"], x, t, ctx, text, ids), ref, what="UNet")

    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, VCFG.latent_channels)).astype(np.float32)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    vae = AutoencoderKL(m.vae_config)
    with torch.no_grad():
        want_dec = pipe.vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
        mean = pipe.vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2))).latent_dist.mean
        want_ae = pipe.vae.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
    errs["vae decode"] = assert_close(vae.apply({"params": m.params["vae"]}, jnp.asarray(z), method="decode"),
                                      want_dec, what="VAE decode")
    errs["vae"] = assert_close(vae.apply({"params": m.params["vae"]}, jnp.asarray(image)), want_ae, what="VAE")

    toks = (Tokenizer(m.tokenizer_path), Tokenizer(m.tokenizer_2_path))
    got = encode_prompts_sdxl(m.text.models(), m.text.param_pair(), toks, PROMPTS, ["", "dog", "x", "cat, dog"],
                              force_zeros_for_empty_prompt=m.force_zeros_for_empty_prompt)
    with torch.no_grad():
        want = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=["", "dog", "x", "cat, dog"])
    for name, g, w in zip(got._fields, got, want):
        errs[name] = assert_close(g, w.numpy(), what=name)
    print("SDXL folder vs diffusers, max abs err:", {k: f"{v:.1e}" for k, v in errs.items()})


def test_fp16_variant_folder(saved, from_folder, tmp_path):
    """Each component only as `*.fp16.safetensors` (half values): loads, to the fp32 params rounded to fp16."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "fp16"
    shutil.copytree(saved[1], folder)
    for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("text_encoder_2", "model")):
        full = folder / name / f"{file}.safetensors"
        save_file({k: v.astype(np.float16) for k, v in load_file(full).items()},
                  folder / name / f"{file}.fp16.safetensors")
        full.unlink()
    m = sdxl.load_sdxl(folder)
    half = jax.tree.map(lambda v: np.asarray(v).astype(np.float16).astype(np.float32), from_folder.params)
    assert_same_params(m.params, half)


def test_converted_folder_round_trips(from_folder, tmp_path):
    """`save_converted_sdxl` -> `load_sdxl` (no torch): same configs, params, tokenizers and text settings."""
    sdxl.save_converted_sdxl(tmp_path / "xl", from_folder)
    m = sdxl.load_sdxl(tmp_path / "xl")
    keep = ("unet_config", "vae_config", "text_config", "text_config_2", "eos_token_id_2", "force_zeros_for_empty_prompt")
    assert all(getattr(m, k) == getattr(from_folder, k) for k in keep)
    assert m.tokenizer_2_path == str(tmp_path / "xl" / "tokenizer_2")
    assert Tokenizer(m.tokenizer_2_path)("a")[0, -1] == Tokenizer(from_folder.tokenizer_2_path)("a")[0, -1]
    assert_same_params(m.params, from_folder.params)
    with pytest.raises(CheckpointError) as e:
        sd15.load_sd15(tmp_path / "xl")
    assert "is a converted SDXL model (text_config_2): load it with an SDXL config" in _one_line(e)
    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.init import random_params
    from animatediff_jax.models.shapes import clip_shapes, vae_shapes

    u, v, c = tiny_unet(None), VAEConfig.tiny(), CLIPTextConfig.tiny()
    sd15.save_converted(tmp_path / "v15", sd15.SD15(u, v, c, {"unet": random_params(unet_shapes(u), 0),
                                                             "vae": random_params(vae_shapes(v), 1),
                                                             "text_encoder": random_params(clip_shapes(c), 2)}))
    with pytest.raises(CheckpointError) as e:
        sdxl.load_sdxl(tmp_path / "v15")
    assert "is a converted SD1.5 model (no text_config_2): load it with an SD1.5 config" in _one_line(e)


def test_convert_cli_writes_the_folders_params(saved, from_folder, tmp_path):
    """`animatediff-jax convert sdxl FOLDER --out DIR`: the params folder `load_sdxl` reads without torch."""
    from animatediff_jax.cli import main as cli_main

    assert cli_main(["convert", "sdxl", str(saved[1]), "--out", str(tmp_path / "xl")]) == 0
    m = sdxl.load_sdxl(tmp_path / "xl")
    assert (m.unet_config, m.text_config_2) == (from_folder.unet_config, from_folder.text_config_2)
    assert_same_params(m.params, from_folder.params)


# ------------------------------------------------------------------------ single files


def test_fixture_layout_round_trips_through_diffusers(saved):
    """The written single file is the layout diffusers' converters read: they map it back exactly."""
    from diffusers.loaders import single_file_utils as sfu

    pipe, _ = saved
    ldm = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sgm_state_dict(pipe).items()}
    for got, model in ((sfu.convert_ldm_unet_checkpoint(ldm, UCFG.to_diffusers()), pipe.unet),
                       (sfu.convert_ldm_vae_checkpoint(ldm, VCFG.to_diffusers()), pipe.vae)):
        want = np_sd(model)
        assert set(got) == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
    assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (UCFG.time_embed_dim, 88)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in ldm  # SDXL's first level: no attention


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_the_folders_params(saved, from_folder, tmp_path, suffix):
    """The same model as an SGM single file -> exactly the folder's params (every key of every part)."""
    path = str(tmp_path / f"sd_xl_tiny{suffix}")
    sd = sgm_state_dict(saved[0])
    if suffix == ".ckpt":
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}}, path)
    else:
        save_state_dict(path, sd)
    m = sdxl.load_sdxl(path, unet_config=UCFG, vae_config=VCFG, text_config=TINY_L, text_config_2=TINY_G)
    assert (m.unet_config, m.vae_config, m.eos_token_id_2) == (UCFG, VCFG, 2)
    assert_same_params(m.params, from_folder.params)


def test_unet_only_file_takes_the_rest_from_a_base(saved, from_folder, tmp_path):
    path = str(tmp_path / "unet_only.safetensors")
    save_state_dict(path, sgm_state_dict(saved[0], parts=("unet",)))
    with pytest.raises(CheckpointError, match=r"has no vae weights and no base SDXL model"):
        sdxl.load_sdxl(path, unet_config=UCFG, vae_config=VCFG, text_config=TINY_L, text_config_2=TINY_G)
    m = sdxl.load_sdxl(path, base=from_folder)
    assert m.params["vae"] is from_folder.params["vae"] and m.tokenizer_path == from_folder.tokenizer_path
    assert_same_params(m.params["unet"], from_folder.params["unet"])


def test_single_file_errors_name_the_files_keys(saved, tmp_path):
    sd = sgm_state_dict(saved[0])
    key = "model.diffusion_model.label_emb.0.2.bias"
    save_state_dict(str(tmp_path / "a.safetensors"), {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"a\.safetensors \(SDXL single file\): unet key {key} is missing"):
        sdxl.load_sdxl(str(tmp_path / "a.safetensors"), unet_config=UCFG, vae_config=VCFG, text_config=TINY_L,
                       text_config_2=TINY_G)
    key = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"  # (level 1: 64 channels)
    assert sd[key].shape == (64, 80)
    save_state_dict(str(tmp_path / "b.safetensors"), {**sd, key: np.zeros((64, 7), np.float32)})
    with pytest.raises(CheckpointError, match=rf"{key}: the file has \(64, 7\), the model needs \(64, 80\)"):
        sdxl.load_sdxl(str(tmp_path / "b.safetensors"), unet_config=UCFG, vae_config=VCFG, text_config=TINY_L,
                       text_config_2=TINY_G)
    # (input_blocks.4 is the tiny UNet's second downsampler: an attention there is no key of the model)
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    save_state_dict(str(tmp_path / "c.safetensors"), {**sd, key: np.zeros((64, 7), np.float32)})
    with pytest.raises(CheckpointError, match=rf"UNet does not fit the model: unexpected keys: {key} \(64, 7\)"):
        sdxl.load_sdxl(str(tmp_path / "c.safetensors"), unet_config=UCFG, vae_config=VCFG, text_config=TINY_L,
                       text_config_2=TINY_G)


# ------------------------------------------------------------------------ SD1.5 vs SDXL


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_family_mismatch_is_one_line(saved, tmp_path):
    """An SDXL file or folder handed to the SD1.5 loader, and the reverse: one line saying what it is."""
    sd = sgm_state_dict(saved[0])
    assert family.is_sdxl_checkpoint(sd) and family.sdxl_evidence(sd) == G_PREFIX + "ln_final.bias"
    full, unet_only = str(tmp_path / "xl.safetensors"), str(tmp_path / "xl_unet.safetensors")
    save_state_dict(full, sd)
    save_state_dict(unet_only, sgm_state_dict(saved[0], parts=("unet",)))
    with pytest.raises(CheckpointError) as e:
        sd15.load_sd15(full)
    assert _one_line(e) == (f"{full} is an SDXL checkpoint ({G_PREFIX}ln_final.bias ...): load it with an SDXL "
                            "config (checkpoints.sdxl.load_sdxl), not SD1.5's")
    with pytest.raises(CheckpointError) as e:
        sd15.load_sd15(unet_only)
    assert f"{unet_only} is an SDXL checkpoint (model.diffusion_model.label_emb.0.0.bias ...)" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        sd15.load_sd15(saved[1])
    assert _one_line(e).startswith(f"{saved[1]} is an SDXL folder ({saved[1]}/unet/config.json: addition_embed_type")

    sd15_file = str(tmp_path / "v1-5.safetensors")
    save_state_dict(sd15_file, {"model.diffusion_model.input_blocks.0.0.bias": np.zeros(4, np.float32),
                                "cond_stage_model.transformer.text_model.final_layer_norm.bias": np.zeros(4, np.float32)})
    assert not family.is_sdxl_checkpoint(["model.diffusion_model.input_blocks.0.0.bias"])
    with pytest.raises(CheckpointError) as e:
        sdxl.load_sdxl(sd15_file)
    assert _one_line(e) == (f"{sd15_file} is an SD1.5 checkpoint (cond_stage_model.transformer.text_model."
                            "final_layer_norm.bias ..., no model.diffusion_model.label_emb.* or conditioner.embedders.* "
                            "keys): load it with an SD1.5 config (checkpoints.sd15.load_sd15), not SDXL's")
    sd15_folder = tmp_path / "sd15"
    (sd15_folder / "unet").mkdir(parents=True)
    (sd15_folder / "unet" / "config.json").write_text(json.dumps(tiny_unet(None).to_diffusers()))
    with pytest.raises(CheckpointError) as e:
        sdxl.load_sdxl(sd15_folder)
    assert _one_line(e).startswith(f"{sd15_folder} is an SD1.5 folder (")


# ------------------------------------------------------------------------ the released layout


def test_real_size_single_file_unet_layout(monkeypatch):
    """Real SDXL base's UNet (diffusers on the meta device) in the single-file layout: the LDM key set of
    `sd_xl_base_1.0` (names and shapes spot-checked), which diffusers' converter maps back exactly, and
    every converted key lands on our tree with its shape, nothing missing or unexpected (shapes only)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = sdxl_unet()
    with torch.device("meta"):
        usd = UNet2DConditionModel(**{k: v for k, v in SDXL_BASE_CONFIG.items() if k != "_class_name"}).state_dict()
    ldm = diffusers_to_ldm(usd, None, None, cfg, VAEConfig.sdxl())
    assert len(ldm) == len(usd) == 1680
    u = "model.diffusion_model."
    known = {
        u + "label_emb.0.0.weight": (1280, 2816),
        u + "label_emb.0.2.weight": (1280, 1280),
        u + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        u + "input_blocks.4.1.proj_in.weight": (640, 640),  # linear projections
        u + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        u + "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        u + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        u + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        u + "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        u + "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in known.items():
        assert tuple(ldm[k].shape) == shape, k
    assert not any(k.startswith(u + "input_blocks.1.1.") for k in ldm)  # no attention at 320 channels
    back = sfu.convert_ldm_unet_checkpoint(ldm, cfg.to_diffusers())
    assert set(back) == set(usd) and all(tuple(back[k].shape) == tuple(usd[k].shape) for k in usd)

    real = torch_io._torch_to_flax_value
    monkeypatch.setattr(torch_io, "_torch_to_flax_value", lambda *a: _Shape(real(*a)))
    zeros = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in back.items()}
    params = sd15.convert_unet_state_dict(zeros, cfg, what="real-size SDXL single-file UNet")  # strict
    got = {p: v.shape for p, v in flatten_dict(params).items()}
    assert got == {p: tuple(v.shape) for p, v in flatten_dict(unet_shapes(cfg)).items()}
    print(f"real SDXL UNet: {len(ldm)} LDM keys -> {len(got)} params")


# ------------------------------------------------------------------------ the sample command


def test_sample_command_runs_the_sdxl_beta_config(from_folder, tmp_path):
    """`animatediff-jax sample --config configs/sample/sdxl_beta.py` on a tiny converted SDXL base and a tiny
    AnimateDiff-SDXL motion module: the command assembles the pipeline `generate` would be given by hand
    (SDXL text encoders, the config's scheduler betas and size conditioning), frames equal to the PNGs."""
    import glob
    import os

    from PIL import Image

    from animatediff_jax.checkpoints.motion import merge_motion
    from animatediff_jax.checkpoints.params_io import save_motion
    from animatediff_jax.cli import main as cli_main
    from animatediff_jax.models.config import MotionConfig
    from animatediff_jax.models.init import random_params
    from animatediff_jax.models.shapes import motion_shapes
    from animatediff_jax.sampling import AnimationPipeline, generate

    cfg = UCFG.with_motion(MotionConfig.for_version("sdxl_beta", heads=2, norm_num_groups=8))
    motion = random_params(motion_shapes(cfg), 7)
    save_motion(tmp_path / "mm_tiny_sdxl.safetensors", motion, cfg)
    sdxl.save_converted_sdxl(tmp_path / "base", from_folder)
    out = str(tmp_path / "out")
    args = ["--config.W=32", "--config.H=32", "--config.L=4", "--config.steps=3", "--config.seed=(3,)",
            "--config.prompt=('the cat',)", "--config.n_prompt=('dog',)", "--config.dtype=float32",
            "--config.original_size=(64, 48)", f"--config.output.dir={out}", "--config.output.formats=('png',)",
            "--config.output.grid=false"]
    rc = cli_main(["sample", "--config", "configs/sample/sdxl_beta.py", f"--config.base_model={tmp_path / 'base'}",
                   f"--config.motion_module={tmp_path / 'mm_tiny_sdxl.safetensors'}"] + args)
    assert rc == 0
    pngs = sorted(glob.glob(os.path.join(out, "sample", "*", "*.png")))
    assert len(pngs) == 4
    frames = np.stack([np.asarray(Image.open(p)) for p in pngs])

    base = sdxl.load_sdxl(tmp_path / "base")
    unet = merge_motion(base.params["unet"], motion, cfg)
    pipe = AnimationPipeline.from_base(dataclasses.replace(base, unet_config=cfg, params={**base.params, "unet": unet}))
    want = generate(pipe, ["the cat"], ["dog"], [3], num_frames=4, height=32, width=32, steps=3, guidance_scale=8.5,
                    scheduler="ddim", scheduler_options={"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                         "beta_end": 0.020, "steps_offset": 1, "clip_sample": False},
                    prompt_syntax="plain", original_size=(64, 48), progress=False).frames[0]
    assert np.abs(frames.astype(int) - want.astype(int)).max() <= 1
    assert frames.std() > 1  # (not a blank video)

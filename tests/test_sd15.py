"""SD1.5 loading, by values: diffusers folders and single-file LDM checkpoints -> our three models.

Reference models are diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers'
`CLIPTextModel` with seeded random weights. LDM files are written by `ldm_fixture`, an
independent inverse of diffusers' key mapping, so reading them back is a real round trip.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from ldm_fixture import CLIP, UNET, VAE, diffusers_to_ldm
from torch_refs import randomize, unet2d_kwargs

from animatediff_jax.checkpoints.sd15 import (
    SD15,
    convert_clip_text,
    convert_unet_state_dict,
    ldm_to_diffusers,
    load_diffusers_folder,
    load_sd15,
    load_single_file,
)
from animatediff_jax.checkpoints.torch_io import CheckpointError, torch_to_flax
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from animatediff_jax.models.config import UNetConfig, sd15_unet, tiny_unet
from animatediff_jax.models.shapes import clip_shapes, unet_shapes, vae_shapes
from animatediff_jax.models.unet import UNet3D
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig

UCFG, VCFG, TCFG = tiny_unet(None), VAEConfig.tiny(), CLIPTextConfig.tiny()
# SD1.5's layout (4 levels, 2 layers per block, 8 heads: 12 input and 12 output blocks, so
# diffusers' substring matching of `input_blocks.1` vs `input_blocks.1x` is exercised) at toy width.
WIDE = sd15_unet(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, cross_attention_dim=16)
FRAMES, HW = 2, 8
CONFIGS = dict(unet_config=UCFG, vae_config=VCFG, text_config=TCFG)


# ----------------------------------------------------------------------------- references


def np_sd(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_unet(cfg: UNetConfig, seed: int):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**unet2d_kwargs(cfg)), seed)


def torch_vae(cfg: VAEConfig, seed: int):
    from diffusers import AutoencoderKL as TorchVAE

    return randomize(TorchVAE(**cfg.to_diffusers()), seed)


def torch_clip(cfg: CLIPTextConfig, seed: int):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    eos = cfg.vocab_size - 1
    hf = HFConfig(**cfg.transformers_kwargs(), bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    return randomize(HFModel(hf), seed)


class Refs:
    """Torch models, their in-memory state dicts, fixed inputs and the reference outputs."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.unet, self.vae, self.clip = torch_unet(UCFG, 1), torch_vae(VCFG, 2), torch_clip(TCFG, 3)
        self.wide = torch_unet(WIDE, 4)
        self.sd = {"unet": np_sd(self.unet), "vae": np_sd(self.vae), "text_encoder": np_sd(self.clip)}
        self.video = rng.standard_normal((1, FRAMES, HW, HW, UCFG.in_channels)).astype(np.float32)
        self.ctx = rng.standard_normal((1, 5, UCFG.cross_attention_dim)).astype(np.float32)
        self.image = rng.uniform(-1, 1, (2, 16, 16, VCFG.in_channels)).astype(np.float32)
        self.ids = rng.integers(0, TCFG.vocab_size, (2, TCFG.max_positions)).astype(np.int32)
        self.t = 321
        with torch.no_grad():
            self.want_unet = self.unet_ref(self.unet)
            self.want_wide = self.unet_ref(self.wide)
            x = torch.from_numpy(self.image.transpose(0, 3, 1, 2))
            mean = self.vae.encode(x).latent_dist.mean
            self.want_vae = self.vae.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
            self.want_clip = self.clip(torch.from_numpy(self.ids).long()).last_hidden_state.numpy()

    def unet_ref(self, unet) -> np.ndarray:
        """The image UNet on each frame of the video (frames folded into the batch)."""
        frames = torch.from_numpy(self.video[0].transpose(0, 3, 1, 2))
        ctx = torch.from_numpy(self.ctx).repeat(FRAMES, 1, 1)
        return unet(frames, torch.tensor(self.t), ctx).sample.numpy().transpose(0, 2, 3, 1)[None]

    def direct_params(self) -> dict:
        """Params converted straight from the in-memory state dicts (no files, no LDM)."""
        return {
            "unet": convert_unet_state_dict(self.sd["unet"], UCFG),
            "vae": torch_to_flax(self.sd["vae"], vae_shapes(VCFG)),
            "text_encoder": convert_clip_text(self.sd["text_encoder"], clip_shapes(TCFG)),
        }


@pytest.fixture(scope="module")
def refs() -> Refs:
    return Refs()


@functools.cache
def _unet_fn(cfg: UNetConfig):
    return jax.jit(lambda p, x, t, c: UNet3D(cfg).apply({"params": p}, x, t, c))


@functools.cache
def _vae_fn(cfg: VAEConfig):
    return jax.jit(lambda p, x: AutoencoderKL(cfg).apply({"params": p}, x))


@functools.cache
def _clip_fn(cfg: CLIPTextConfig):
    return jax.jit(lambda p, ids: CLIPTextModel(cfg).apply({"params": p}, ids))


def unet_out(cfg: UNetConfig, params, refs: Refs):
    return _unet_fn(cfg)(params, jnp.asarray(refs.video), jnp.asarray(refs.t), jnp.asarray(refs.ctx))


def check_outputs(model: SD15, refs: Refs, what: str) -> dict[str, float]:
    """Our three models with `model`'s params against the torch references (fp32, 1e-5 relative)."""
    p = model.params
    errs = {
        "unet": assert_close(unet_out(model.unet_config, p["unet"], refs), refs.want_unet, what=f"{what} UNet"),
        "vae": assert_close(_vae_fn(model.vae_config)(p["vae"], refs.image), refs.want_vae, what=f"{what} VAE"),
        "clip": assert_close(
            _clip_fn(model.text_config)(p["text_encoder"], refs.ids), refs.want_clip, what=f"{what} CLIP"
        ),
    }
    print(what, {k: f"{v:.2e}" for k, v in errs.items()})
    return errs


def assert_same_params(got, want) -> None:
    """Exactly the weights of a direct conversion: same tree, same values (no key was swapped)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------------------- writers


def write_folder(refs: Refs, folder, *, safetensors: bool) -> None:
    """A diffusers SD folder as `save_pretrained` writes it; `.bin` weights when not `safetensors`."""
    refs.unet.save_pretrained(folder / "unet", safe_serialization=safetensors)
    refs.vae.save_pretrained(folder / "vae", safe_serialization=safetensors)
    if safetensors:
        refs.clip.save_pretrained(folder / "text_encoder")
    else:  # transformers 5 writes only safetensors: write an older SD1.5 folder's pytorch_model.bin.
        (folder / "text_encoder").mkdir()
        refs.clip.config.to_json_file(folder / "text_encoder" / "config.json")
        sd = {"text_model." + k: v for k, v in refs.clip.state_dict().items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(TCFG.max_positions)[None]
        torch.save(sd, folder / "text_encoder" / "pytorch_model.bin")
    (folder / "tokenizer").mkdir()


def ldm_state_dict(refs: Refs, parts=("unet", "vae", "text_encoder"), unet=None, unet_cfg=UCFG) -> dict:
    """An LDM single-file state dict, with the extra buffers real SD1.5 files carry."""
    sd = diffusers_to_ldm(
        unet if unet is not None else (refs.sd["unet"] if "unet" in parts else None),
        refs.sd["vae"] if "vae" in parts else None,
        refs.sd["text_encoder"] if "text_encoder" in parts else None,
        unet_cfg,
        VCFG,
    )
    if "text_encoder" in parts:
        sd[CLIP + "text_model.embeddings.position_ids"] = np.arange(TCFG.max_positions, dtype=np.int64)[None]
    sd["alphas_cumprod"] = np.linspace(1, 0.01, 1000, dtype=np.float32)
    sd["model_ema.decay"] = np.array(0.9999, np.float32)
    sd["model_ema.num_updates"] = np.array(470000, np.int32)
    return sd


def write_ldm(sd: dict, path) -> str:
    """`.safetensors` via safetensors.torch, anything else as a `{"state_dict": ...}` pickle (`.ckpt`)."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 470000}, str(path))
    return str(path)


# --------------------------------------------------------------------------------- tests


def test_ldm_layout_round_trips_through_diffusers(refs):
    """fixture (diffusers -> LDM) then diffusers' converters (LDM -> diffusers) is the identity."""
    ldm = ldm_state_dict(refs)
    back = ldm_to_diffusers(ldm, UCFG, VCFG)
    clip = {"text_model." + k: v for k, v in refs.sd["text_encoder"].items()}
    for name, want in (("unet", refs.sd["unet"]), ("vae", refs.sd["vae"]), ("text_encoder", clip)):
        got = {k: v for k, v in back[name].items() if not k.endswith("position_ids")}
        assert set(got) == set(want), f"{name}: {sorted(set(got) ^ set(want))[:6]}"
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")
    # The LDM file really is in LDM layout: VAE attention as 1x1 convs, UNet proj_in as 1x1 conv.
    assert ldm[VAE + "decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ldm[UNET + "input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    assert ldm[UNET + "output_blocks.1.1.conv.weight"].shape == (64, 64, 3, 3)  # upsampler, no attention


def test_sd15_size_layout_is_the_compvis_one():
    """Full-size SD1.5 on the meta device (no memory): the fixture writes the real LDM key set
    (686 UNet + 248 VAE keys, as in v1-5-pruned), and diffusers' converters map it back exactly."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    ucfg, vcfg = sd15_unet(), VAEConfig.sd15()
    with torch.device("meta"):
        usd = UNet2DConditionModel(**ucfg.to_diffusers()).state_dict()
        vsd = TorchVAE(**vcfg.to_diffusers()).state_dict()
    ldm = diffusers_to_ldm(usd, vsd, None, ucfg, vcfg)
    assert sum(k.startswith(UNET) for k in ldm) == 686 and sum(k.startswith(VAE) for k in ldm) == 248
    known = {  # names and shapes as in the CompVis SD1.5 release
        UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        UNET + "input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        UNET + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        UNET + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        UNET + "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        UNET + "out.2.weight": (4, 320, 3, 3),
        VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        VAE + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    }
    for k, shape in known.items():
        assert tuple(ldm[k].shape) == shape, k
    unet_back = sfu.convert_ldm_unet_checkpoint(ldm, ucfg.to_diffusers())
    vae_back = sfu.convert_ldm_vae_checkpoint(ldm, vcfg.to_diffusers())
    for want, got in ((usd, unet_back), (vsd, vae_back)):
        assert set(got) == set(want)
        assert all(tuple(got[k].shape) == tuple(want[k].shape) for k in want)
    # Every converted UNet key has a param of ours; SD1.5's 1x1-conv proj_in/proj_out become Dense kernels.
    from flax.traverse_util import flatten_dict

    from animatediff_jax.checkpoints.torch_io import torch_module_path

    ours = flatten_dict(unet_shapes(ucfg))
    for k, v in unet_back.items():
        mod, leaf = torch_module_path(k)
        flax_leaf = {"weight": ("kernel", "scale", "embedding")}.get(leaf, (leaf,))
        hits = [ours[mod + (c,)] for c in flax_leaf if mod + (c,) in ours]
        assert len(hits) == 1, k
        if mod[-1] in ("proj_in", "proj_out") and leaf == "weight":
            assert tuple(v.shape) == (hits[0].shape[1], hits[0].shape[0], 1, 1), k
    assert len(unet_back) == len(ours)
    w = np.random.default_rng(0).standard_normal((320, 320, 1, 1)).astype(np.float32)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    got = torch_to_flax({key: w}, unet_shapes(ucfg), strict=False)
    np.testing.assert_array_equal(got["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"], w[:, :, 0, 0].T)


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_diffusers_folder(refs, tmp_path, safetensors):
    write_folder(refs, tmp_path, safetensors=safetensors)
    names = {n for sub in ("unet", "vae", "text_encoder") for n in os.listdir(tmp_path / sub)}
    assert any(n.endswith(".bin") for n in names) != safetensors
    model = load_sd15(tmp_path)
    assert (model.unet_config, model.vae_config, model.text_config) == (UCFG, VCFG, TCFG)
    assert model.tokenizer_path == str(tmp_path / "tokenizer")
    assert_same_params(model.params, refs.direct_params())
    check_outputs(model, refs, f"folder ({'safetensors' if safetensors else 'bin'})")


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_single_file(refs, tmp_path, ext):
    path = write_ldm(ldm_state_dict(refs), tmp_path / f"model{ext}")
    model = load_single_file(path, **CONFIGS)
    assert (model.unet_config, model.vae_config, model.text_config) == (UCFG, VCFG, TCFG)
    assert_same_params(model.params, refs.direct_params())
    check_outputs(model, refs, f"LDM {ext}")
    assert_same_params(load_sd15(path, **CONFIGS).params, model.params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_single_file(refs, tmp_path, dtype):
    """fp16 / bf16 files (most CivitAI models) load as fp32 params holding the rounded weights."""
    path = tmp_path / "half.safetensors"
    from safetensors.torch import save_file

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm_state_dict(refs).items()}
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(path))
    model = load_single_file(path, **CONFIGS)
    want = jax.tree.map(lambda a: np.asarray(torch.from_numpy(np.asarray(a)).to(dtype).float()), refs.direct_params())
    assert_same_params(model.params, want)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(model.params))


def test_partial_file_takes_the_rest_from_base(refs, tmp_path):
    """A UNet-only file in SD1.5's full layout (12 input/output blocks) over a base folder."""
    write_folder(refs, tmp_path / "base", safetensors=True)
    base = load_diffusers_folder(tmp_path / "base")
    wide_sd = np_sd(refs.wide)
    path = write_ldm(ldm_state_dict(refs, parts=("unet",), unet=wide_sd, unet_cfg=WIDE), tmp_path / "unet.safetensors")
    model = load_single_file(path, base=base, unet_config=WIDE)
    assert model.unet_config == WIDE and (model.vae_config, model.text_config) == (VCFG, TCFG)
    assert model.params["vae"] is base.params["vae"] and model.params["text_encoder"] is base.params["text_encoder"]
    assert model.tokenizer_path == base.tokenizer_path
    assert_same_params(model.params["unet"], convert_unet_state_dict(wide_sd, WIDE))
    err = assert_close(unet_out(WIDE, model.params["unet"], refs), refs.want_wide, what="SD1.5-layout UNet from LDM")
    print(f"SD1.5-layout UNet from LDM max abs err {err:.2e}")
    with pytest.raises(CheckpointError, match=r"unet\.safetensors.*no vae weights"):
        load_single_file(path, unet_config=WIDE)
    # UNet + text encoder (a common DreamBooth export): the VAE alone comes from the base.
    path2 = write_ldm(ldm_state_dict(refs, parts=("unet", "text_encoder")), tmp_path / "unet_clip.ckpt")
    model2 = load_single_file(path2, base=base)
    assert model2.params["vae"] is base.params["vae"]
    assert_same_params(model2.params, refs.direct_params())


# ------------------------------------------------------------------------------ bad input


def test_not_a_stable_diffusion_folder(refs, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}.*unet.*config\.json"):
        load_sd15(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such"):
        load_sd15(tmp_path / "missing")
    # Configs but no weights: the component folder is named.
    for sub, module in (("unet", refs.unet), ("vae", refs.vae)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(dict(module.config)))
    (tmp_path / "text_encoder").mkdir()
    refs.clip.config.to_json_file(tmp_path / "text_encoder" / "config.json")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'unet'}: no weight file"):
        load_sd15(tmp_path)
    # A config we cannot read, or one for another architecture: the config file is named.
    unet_json = tmp_path / "unet" / "config.json"
    unet_json.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{unet_json}: JSONDecodeError"):
        load_sd15(tmp_path)
    unet_json.write_text(json.dumps(dict(refs.unet.config, down_block_types=["AttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(CheckpointError, match=rf"{unet_json}: .*AttnDownBlock2D"):
        load_sd15(tmp_path)
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    unet_json.write_text(json.dumps(dict(refs.unet.config)))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'text_encoder' / 'config.json'}: KeyError"):
        load_sd15(tmp_path)


def test_unreadable_files(refs, tmp_path):
    good = write_ldm(ldm_state_dict(refs), tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    junk_ckpt = tmp_path / "junk.ckpt"
    junk_ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"this is not a checkpoint" * 100)
    for path, msg in ((truncated, "cannot be read"), (junk_ckpt, "refused: unsafe or not a checkpoint"),
                      (junk_st, "cannot be read")):
        with pytest.raises(CheckpointError, match=rf"{path}: {msg}"):
            load_single_file(path, **CONFIGS)
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    with pytest.raises(CheckpointError, match=rf"{notes}: unknown weight file extension"):
        load_single_file(notes, **CONFIGS)
    # A real weight file that is not an LDM checkpoint (a diffusers UNet's own file).
    diffusers_unet = write_ldm(refs.sd["unet"], tmp_path / "diffusers_unet.safetensors")
    with pytest.raises(CheckpointError, match=rf"{diffusers_unet}: not a single-file LDM"):
        load_single_file(diffusers_unet, **CONFIGS)


@pytest.mark.parametrize(
    "key",
    [
        UNET + "input_blocks.1.0.in_layers.2.weight",
        UNET + "output_blocks.1.1.conv.bias",
        VAE + "decoder.up.0.block.0.nin_shortcut.weight",
        VAE + "encoder.mid.attn_1.q.weight",
        CLIP + "text_model.encoder.layers.1.mlp.fc2.bias",
    ],
)
@pytest.mark.parametrize("change", ["removed", "reshaped"])
def test_bad_ldm_key_is_named(refs, tmp_path, key, change):
    sd = ldm_state_dict(refs)
    assert key in sd
    if change == "removed":
        del sd[key]
    else:
        sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,), np.float32)
    path = write_ldm(sd, tmp_path / f"bad{change}.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_single_file(path, **CONFIGS)
    msg = str(info.value)
    print(msg)
    assert path in msg and key in msg, msg

"""The SD1.5 diffusers folder as published: every naming and variant `from_pretrained` reads.

The released `stable-diffusion-v1-5` folder keeps the VAE mid-block attention under its old names
(`query`/`key`/`value`/`proj_attn`), the text encoder's `text_model.` prefix and `position_ids`
buffer, and ships `*.fp16.*` variants beside (some mirrors: instead of) the full weights. Each
folder here is written from the reference models' own `state_dict()` renamed to the released
names, then loaded by us and by diffusers / transformers `from_pretrained`, and the outputs are
compared (fp32, 1e-5 relative to the reference's scale; 2e-5 at real size).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file
from test_sd15 import TCFG, UCFG, VCFG, _clip_fn, torch_clip, torch_unet, torch_vae

from animatediff_jax.checkpoints.sd15 import convert_vae, load_diffusers_folder, load_sd15
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.vae import AutoencoderKL, VAEConfig

OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def released_vae_names(sd: dict) -> dict:
    """diffusers' current VAE keys -> the names in SD1.5's published `vae/` weights."""
    out = {}
    for k, v in sd.items():
        for new, old in OLD_NAMES.items():
            if ".mid_block.attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


def released_clip_names(sd: dict, *, prefix: bool, position_ids: bool, positions: int) -> dict:
    """transformers' CLIPTextModel keys, with or without `text_model.` and the `position_ids` buffer."""
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    if position_ids:
        sd["embeddings.position_ids"] = torch.arange(positions)[None]
    return {("text_model." + k if prefix else k): v for k, v in sd.items()}


def write(sd: dict, folder, name: str, config_writer) -> None:
    """One component folder: `config.json` and the weights as `name` (.safetensors or a pickled .bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    config_writer(folder)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if name.endswith(".safetensors"):
        save_file(sd, str(folder / name))
    else:
        torch.save(sd, folder / name)


def half(sd: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def write_released_folder(root, vae, clip, *, vae_old: bool, prefix: bool, position_ids: bool, files: str) -> None:
    """An SD1.5 folder as published: `files` is "safetensors", "bin", "fp16.safetensors", "fp16.bin"."""
    fp16, ext = files.startswith("fp16"), files.rsplit(".", 1)[-1]
    variant = ".fp16" if fp16 else ""
    cast = half if fp16 else (lambda sd: sd)
    vsd = released_vae_names(vae.state_dict()) if vae_old else dict(vae.state_dict())
    write(cast(vsd), root / "vae", f"diffusion_pytorch_model{variant}.{ext}", vae.save_config)
    positions = clip.config.max_position_embeddings
    csd = released_clip_names(clip.state_dict(), prefix=prefix, position_ids=position_ids, positions=positions)
    clip_name = f"model{variant}.safetensors" if ext == "safetensors" else f"pytorch_model{variant}.bin"
    write(cast(csd), root / "text_encoder", clip_name, lambda f: clip.config.to_json_file(f / "config.json"))
    unet = torch_unet(UCFG, 1)
    unet.save_pretrained(root / "unet")


def compare_with_from_pretrained(root, vae_cfg, text_cfg, *, variant: str | None, image_hw: int, what: str):
    """Our load of `root` against diffusers' / transformers' own load of the same folder."""
    from diffusers import AutoencoderKL as TorchVAE
    from transformers import CLIPTextModel as HFModel

    ours = load_sd15(root)
    assert (ours.vae_config, ours.text_config) == (vae_cfg, text_cfg)
    kw = dict(variant=variant, torch_dtype=torch.float32)
    ref_vae = TorchVAE.from_pretrained(root / "vae", **kw).eval()
    ref_clip = HFModel.from_pretrained(root / "text_encoder", **kw).eval()
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, image_hw, image_hw, 3)).astype(np.float32)
    ids = rng.integers(0, text_cfg.vocab_size, (2, text_cfg.max_positions)).astype(np.int64)
    with torch.no_grad():
        mean = ref_vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2))).latent_dist.mean
        want_mean = mean.numpy().transpose(0, 2, 3, 1)
        want_decoded = ref_vae.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
        want_text = ref_clip(torch.from_numpy(ids)).last_hidden_state.numpy()
    model = AutoencoderKL(vae_cfg)
    got_mean, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(
        ours.params["vae"], image
    )
    got_decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(
        ours.params["vae"], want_mean
    )
    got_text = _clip_fn(text_cfg)(ours.params["text_encoder"], ids.astype(np.int32))
    errs = dict(
        vae_mean=assert_close(got_mean, want_mean, rtol=2e-5, what=f"{what} VAE mean"),
        vae_decode=assert_close(got_decoded, want_decoded, rtol=2e-5, what=f"{what} VAE decode"),
        text=assert_close(got_text, want_text, rtol=2e-5, what=f"{what} text encoder"),
    )
    print(what, {k: f"{v:.2e}" for k, v in errs.items()})
    return ours, ref_vae


def test_published_sd15_folder_at_real_size(tmp_path):
    """SD1.5's real VAE and text-encoder key layouts, named as published, against from_pretrained."""
    vcfg, tcfg = VAEConfig.sd15(), CLIPTextConfig.sd15()
    vae, clip = torch_vae(vcfg, 11), torch_clip(tcfg, 12)
    write_released_folder(tmp_path, vae, clip, vae_old=True, prefix=True, position_ids=True, files="safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # The published names: 16 old-style attention keys (encoder + decoder, q/k/v/out, weight + bias).
    assert "encoder.mid_block.attentions.0.query.weight" in keys and "decoder.mid_block.attentions.0.proj_attn.bias" in keys
    assert sum(".mid_block.attentions.0." in k and k.split(".")[-2] in OLD_NAMES.values() for k in keys) == 16
    assert not any(".to_q." in k for k in keys)
    ours, ref_vae = compare_with_from_pretrained(tmp_path, vcfg, tcfg, variant=None, image_hw=32, what="published SD1.5")
    # diffusers itself read the old names into the new modules (the same weights as the source model).
    for name in ("encoder.mid_block.attentions.0.to_q.weight", "decoder.mid_block.attentions.0.to_out.0.bias"):
        assert torch.equal(ref_vae.state_dict()[name], vae.state_dict()[name])


CASES = [  # (files, VAE old names, text_model. prefix, position_ids)
    ("fp16.safetensors", True, True, True),  # a folder holding only the fp16 variant, names as published
    ("fp16.bin", False, False, False),
    ("bin", True, False, True),
    ("safetensors", False, True, False),
]


@pytest.mark.parametrize("files,vae_old,prefix,position_ids", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_every_naming_and_variant(tmp_path, files, vae_old, prefix, position_ids):
    vae, clip = torch_vae(VCFG, 2), torch_clip(TCFG, 3)
    write_released_folder(tmp_path, vae, clip, vae_old=vae_old, prefix=prefix, position_ids=position_ids, files=files)
    variant = "fp16" if files.startswith("fp16") else None
    ours, _ = compare_with_from_pretrained(tmp_path, VCFG, TCFG, variant=variant, image_hw=16, what=files)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(ours.params))


def test_full_precision_is_preferred_to_the_fp16_variant(tmp_path):
    """The published folder holds both: like `from_pretrained` without `variant`, the fp32 file is read."""
    vae, clip = torch_vae(VCFG, 2), torch_clip(TCFG, 3)
    write_released_folder(tmp_path, vae, clip, vae_old=True, prefix=True, position_ids=True, files="fp16.safetensors")
    write_released_folder(tmp_path, vae, clip, vae_old=True, prefix=True, position_ids=True, files="safetensors")
    ours = load_diffusers_folder(tmp_path, components=("vae",))
    q = ours.params["vae"]["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"]
    want = vae.state_dict()["encoder.mid_block.attentions.0.to_q.weight"].numpy().T
    np.testing.assert_array_equal(q, want)
    assert not np.array_equal(want, want.astype(np.float16).astype(np.float32))  # fp16 would have differed


# ------------------------------------------------------------------------------ bad input


def test_half_renamed_vae_names_both_namings(tmp_path):
    vae = torch_vae(VCFG, 2)
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    old = released_vae_names(sd)
    mixed = dict(old)
    for k in [k for k in old if k.startswith("decoder.") and ".mid_block.attentions.0.key." in k]:
        mixed[k.replace(".key.", ".to_k.")] = mixed.pop(k)
    with pytest.raises(CheckpointError) as info:
        convert_vae(mixed, VCFG, what="vae/diffusion_pytorch_model.safetensors")
    msg = str(info.value)
    print(msg)
    assert "mixes the old VAE attention names" in msg
    assert "decoder.mid_block.attentions.0.to_k.weight" in msg and "decoder.mid_block.attentions.0.query.bias" in msg
    # Both namings of the same weight (diffusers would keep one silently): an error too.
    both = dict(sd, **{"encoder.mid_block.attentions.0.query.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(CheckpointError, match=r"encoder\.mid_block\.attentions\.0\.query\.weight"):
        convert_vae(both, VCFG)
    # A missing old-named weight is named as the file would name it, with its shape.
    partial = dict(old)
    gone = partial.pop("encoder.mid_block.attentions.0.value.bias")
    with pytest.raises(CheckpointError, match=rf"missing keys: encoder\.mid_block\.attentions\.0\.value\.bias \({gone.shape[0]},\)"):
        convert_vae(partial, VCFG)
    # A key the model has no place for is never dropped.
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.mid_block\.attentions\.0\.rel_pos\.weight"):
        convert_vae(dict(sd, **{"encoder.mid_block.attentions.0.rel_pos.weight": np.zeros(3, np.float32)}), VCFG)


def test_wrong_position_ids_and_mixed_prefixes_are_named(tmp_path):
    clip = torch_clip(TCFG, 3)
    vae = torch_vae(VCFG, 2)
    write_released_folder(tmp_path, vae, clip, vae_old=False, prefix=True, position_ids=True, files="safetensors")
    path = tmp_path / "text_encoder" / "model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["text_model.embeddings.position_ids"] = torch.arange(TCFG.max_positions)[None].flip(-1).contiguous()
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*text_model\.embeddings\.position_ids.*not arange"):
        load_sd15(tmp_path)
    sd["text_model.embeddings.position_ids"] = torch.arange(TCFG.max_positions)[None]
    bare = sd.pop("text_model.final_layer_norm.weight")
    sd["final_layer_norm.weight"] = bare  # one key without the prefix among prefixed ones
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected keys: final_layer_norm\.weight"):
        load_sd15(tmp_path)
    json.loads((tmp_path / "text_encoder" / "config.json").read_text())  # the config was left intact


def test_vae_and_text_encoder_with_chunked_attention(small_attention_blocks):
    """The VAE mid-block and CLIP (causal) attention through the blockwise kernel: same outputs as PyTorch."""
    import jax.numpy as jnp
    from test_sd15 import Refs, _vae_fn  # noqa: F401

    from animatediff_jax.models.clip_text import CLIPTextModel

    refs = Refs()
    params = refs.direct_params()
    vae = AutoencoderKL(VCFG, attention="chunked")
    image = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)  # 16x16 = 256 tokens
    with torch.no_grad():
        want = refs.vae.decode(refs.vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2))).latent_dist.mean).sample
    got = jax.jit(lambda p, x: vae.apply({"params": p}, x))(params["vae"], image)
    e_vae = assert_close(got, want.numpy().transpose(0, 2, 3, 1), what="VAE (chunked attention)")
    clip = CLIPTextModel(TCFG, attention="chunked")
    got = jax.jit(lambda p, ids: clip.apply({"params": p}, ids))(params["text_encoder"], jnp.asarray(refs.ids))
    e_clip = assert_close(got, refs.want_clip, what="CLIP text (chunked causal attention)")
    print(f"chunked attention: VAE {e_vae:.2e}, CLIP {e_clip:.2e}")


def test_readme_convert_example_on_a_published_folder(tmp_path, capsys):
    """`animatediff-jax convert sd15 path/to/stable-diffusion-v1-5 --out models/sd15` (the README's first
    example) on a folder laid out as published, then the converted folder holds the same weights."""
    from animatediff_jax import cli

    vae, clip = torch_vae(VCFG, 2), torch_clip(TCFG, 3)
    src = tmp_path / "stable-diffusion-v1-5"
    write_released_folder(src, vae, clip, vae_old=True, prefix=True, position_ids=True, files="fp16.safetensors")
    (src / "tokenizer").mkdir()
    from animatediff_jax.testing.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(str(src / "tokenizer"))
    rc = cli.main(["convert", "sd15", str(src), "--out", str(tmp_path / "sd15")])
    assert rc in (0, None), capsys.readouterr().err
    converted, direct = load_sd15(tmp_path / "sd15"), load_sd15(src)
    jax.tree.map(np.testing.assert_array_equal, converted.params, direct.params)
    want = vae.state_dict()["decoder.mid_block.attentions.0.to_k.weight"].half().float().numpy().T
    np.testing.assert_array_equal(converted.params["vae"]["decoder"]["mid_block"]["attentions_0"]["to_k"]["kernel"], want)

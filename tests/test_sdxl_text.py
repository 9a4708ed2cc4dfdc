"""SDXL's text side against transformers / diffusers: the bigG-style tower (gelu, projection, pooling),
`encode_prompts_sdxl` against `StableDiffusionXLPipeline.encode_prompt`, and the files users have
(diffusers folders, single files with OpenCLIP naming), down to the released bigG layout."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.checkpoints import sdxl
from animatediff_jax.checkpoints.sd15 import convert_clip_text
from animatediff_jax.checkpoints.torch_io import CheckpointError, save_state_dict, torch_key, torch_shape, torch_to_flax
from animatediff_jax.models.clip_text import CLIPTextConfig, SDXLTextEncoder
from animatediff_jax.models.shapes import sdxl_text_shapes
from animatediff_jax.parity import randomize
from animatediff_jax.testing.tiny import write_tiny_tokenizer
from animatediff_jax.text import Tokenizer, encode_prompts_sdxl

# Two towers of different widths (so the concatenation order shows), the second bigG-like: exact gelu,
# a projection to a third width. The vocabulary is the tiny tokenizer's ids and more.
TINY_L = CLIPTextConfig.tiny()
TINY_G = CLIPTextConfig(vocab_size=1000, hidden_size=48, intermediate_size=96, num_layers=4, num_heads=4,
                        hidden_act="gelu", projection_dim=40)
L_PREFIX, G_PREFIX = sdxl.SGM_CLIP_L_PREFIX, sdxl.SGM_CLIP_G_PREFIX
PROMPTS = ["a dog, and the cat!", "x9 y", "cat " * 100, ""]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(folder, folder_2, vocab): SD1.5-style tiny tokenizer (pads with end-of-text) and SDXL
    `tokenizer_2`-style (pads with "!")."""
    root = tmp_path_factory.mktemp("tok")
    vocab = write_tiny_tokenizer(str(root / "tokenizer"))
    write_tiny_tokenizer(str(root / "tokenizer_2"), pad_token="!")
    return str(root / "tokenizer"), str(root / "tokenizer_2"), vocab


def hf_text(cfg: CLIPTextConfig, vocab: dict, eos_token_id: int, seed: int):
    """transformers' `CLIPTextModel` (no projection) or `CLIPTextModelWithProjection`, random, eval, fp32."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if cfg.projection_dim is not None else CLIPTextModel
    hf_cfg = HFConfig(**cfg.transformers_kwargs(), bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos_token_id,
                      pad_token_id=1)
    return randomize(cls(hf_cfg), seed)


def np_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def to_open_clip(sd: dict[str, np.ndarray], prefix: str = G_PREFIX) -> dict[str, np.ndarray]:
    """A transformers `CLIPTextModelWithProjection` state dict in the released OpenCLIP naming
    (written from open_clip's `TextTransformer`, independently of `checkpoints.sdxl`)."""
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": np.ascontiguousarray(sd["text_projection.weight"].T),
        "logit_scale": np.array(np.log(1 / 0.07), np.float32),
    }
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for i in range(n):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate([sd[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for a, b in layer_names.items():
                out[f"{dst}{b}.{leaf}"] = sd[f"{src}{a}.{leaf}"]
    return {prefix + k: v for k, v in out.items()}


def tokenize(folder: str, prompts):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


# ------------------------------------------------------------------------ the towers


@pytest.mark.parametrize("legacy_eos", [True, False], ids=["eos_token_id=2", "eos_token_id=EOS"])
def test_tiny_bigg_tower_matches_transformers(tokenizers, legacy_eos):
    """Hidden states at every clip_skip (no final norm) and the projected pooled output, both pooling rules."""
    _, tok2, vocab = tokenizers
    eos = 2 if legacy_eos else vocab["<|endoftext|>"]
    ref = hf_text(TINY_G, vocab, eos, seed=1)
    params = convert_clip_text(np_state_dict(ref), sdxl_text_shapes(TINY_G))
    model = SDXLTextEncoder(TINY_G, eos_token_id=eos)
    ids = tokenize(tok2, PROMPTS)
    assert ids[1, 4] == vocab["<|endoftext|>"] and (ids[1, 5:] == vocab["!"]).all()  # padded with "!", not the end-of-text token
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    assert len(out.hidden_states) == TINY_G.num_layers + 1
    apply = jax.jit(model.apply, static_argnums=2)
    errs = []
    for skip in (None, 1, 2, TINY_G.num_layers - 1):
        hidden, embeds = apply({"params": params}, jnp.asarray(ids), skip)
        want = out.hidden_states[-((skip or 0) + 2)].numpy()
        errs.append(assert_close(hidden, want, what=f"hidden clip_skip={skip}"))
        # The pooled output is always the last layer's, whatever clip_skip is (diffusers' too).
        errs.append(assert_close(embeds, out.text_embeds.numpy(), what=f"text_embeds clip_skip={skip}"))
    print(f"tiny bigG ({'legacy' if legacy_eos else 'eos id'} pooling) max abs err {max(errs):.2e}")
    with pytest.raises(ValueError, match="clip_skip"):
        model.apply({"params": params}, jnp.asarray(ids), TINY_G.num_layers)
    # The comparison tells the activations apart (transformers' "gelu" is the exact erf one).
    quick = SDXLTextEncoder(dataclasses.replace(TINY_G, hidden_act="quick_gelu"), eos_token_id=eos)
    assert np.abs(quick.apply({"params": params}, jnp.asarray(ids))[1] - out.text_embeds.numpy()).max() > 1e-3


def test_tiny_first_tower_has_no_projection(tokenizers):
    tok, _, vocab = tokenizers
    ref = hf_text(TINY_L, vocab, vocab["<|endoftext|>"], seed=2)
    params = convert_clip_text(np_state_dict(ref), sdxl_text_shapes(TINY_L))
    assert "text_projection" not in params and "final_layer_norm" in params["text_model"]
    ids = tokenize(tok, PROMPTS)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    for skip in (None, 2):
        hidden, embeds = SDXLTextEncoder(TINY_L).apply({"params": params}, jnp.asarray(ids), skip)
        assert embeds is None
        assert_close(hidden, out.hidden_states[-((skip or 0) + 2)].numpy(), what=f"ViT-L-style clip_skip={skip}")


# ------------------------------------------------------------------------ encode_prompt


@pytest.fixture(scope="module")
def sdxl_pair(tokenizers):
    """(diffusers `StableDiffusionXLPipeline` of two tiny towers and tokenizers, our `SDXLText` of the same)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok, tok2, vocab = tokenizers
    ref_l = hf_text(TINY_L, vocab, 2, seed=3)  # eos_token_id 2: SDXL's released configs
    ref_g = hf_text(TINY_G, vocab, 2, seed=4)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=ref_l, text_encoder_2=ref_g, unet=None, scheduler=None, add_watermarker=False,
        tokenizer=CLIPTokenizer.from_pretrained(tok, local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok2, local_files_only=True),
    )
    ours = sdxl.SDXLText(TINY_L, TINY_G, {
        "text_encoder": convert_clip_text(np_state_dict(ref_l), sdxl_text_shapes(TINY_L)),
        "text_encoder_2": convert_clip_text(np_state_dict(ref_g), sdxl_text_shapes(TINY_G)),
    }, tokenizer_path=tok, tokenizer_2_path=tok2)
    return pipe, ours


def _ours(text: sdxl.SDXLText, *args, **kwargs):
    toks = (Tokenizer(text.tokenizer_path), Tokenizer(text.tokenizer_2_path))
    return encode_prompts_sdxl(text.models(), text.param_pair(), toks, *args, **kwargs)


CASES = {
    "negatives": dict(prompt=PROMPTS, negative_prompt=["", "the dog", "x", "cat, dog"]),
    "clip_skip=1": dict(prompt=PROMPTS, negative_prompt=["the dog", "", "", "y"], clip_skip=1),
    "clip_skip=2": dict(prompt=PROMPTS[:2], negative_prompt="dog", clip_skip=2),
    "no negative: zeros": dict(prompt=PROMPTS[:2]),
    "no negative, no force_zeros": dict(prompt=PROMPTS[:2], force_zeros=False),
    "prompt_2": dict(prompt=PROMPTS[:2], prompt_2=["the cat", "dog"], negative_prompt="x",
                     negative_prompt_2=["y", "the"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_prompts_sdxl_matches_diffusers_encode_prompt(sdxl_pair, case):
    pipe, ours = sdxl_pair
    kw = dict(CASES[case])
    force_zeros = kw.pop("force_zeros", True)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    with torch.no_grad():
        want = pipe.encode_prompt(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, **kw)
    got = _ours(ours, kw["prompt"], kw.get("negative_prompt"), prompts_2=kw.get("prompt_2"),
                negative_prompts_2=kw.get("negative_prompt_2"), clip_skip=kw.get("clip_skip"),
                force_zeros_for_empty_prompt=force_zeros)
    n = len(kw["prompt"])
    assert got.prompt_embeds.shape == (n, 77, TINY_L.hidden_size + TINY_G.hidden_size)
    assert got.pooled_prompt_embeds.shape == (n, TINY_G.projection_dim)
    errs = []
    for name, g, w in zip(got._fields, got, want):
        if case == "no negative: zeros" and name.startswith("negative"):
            assert not w.numpy().any()
            np.testing.assert_array_equal(g, w.numpy())
            continue
        errs.append(assert_close(g, w.numpy(), what=f"{case}: {name}"))
    print(f"encode_prompts_sdxl vs diffusers [{case}] max abs err {max(errs):.2e}")


def test_explicit_empty_negative_is_encoded_not_zeroed(sdxl_pair):
    """diffusers zeroes the negatives only for `negative_prompt=None`; "" is encoded."""
    _, ours = sdxl_pair
    got = _ours(ours, ["the cat"], [""])
    assert np.abs(np.asarray(got.negative_prompt_embeds)).max() > 0.1
    assert np.abs(np.asarray(got.negative_pooled_prompt_embeds)).max() > 0.1
    with pytest.raises(ValueError, match="negative_prompts: 3 prompts for a batch of 1"):
        _ours(ours, ["the cat"], ["", "", ""])


# ------------------------------------------------------------------------ files


def test_single_file_openclip_naming_loads_exactly(tmp_path, tokenizers):
    """A single-file SDXL checkpoint: ViT-L in transformers' names under `conditioner.embedders.0.transformer.`
    (with position_ids), bigG in OpenCLIP's under `conditioner.embedders.1.model.` (fused q/k/v, transposed
    projection, logit_scale); unrelated UNet keys ignored. Params equal the transformers conversion's."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    _, _, vocab = tokenizers
    ref_l, ref_g = hf_text(TINY_L, vocab, 2, seed=5), hf_text(TINY_G, vocab, 2, seed=6)
    sd_l, sd_g = np_state_dict(ref_l), np_state_dict(ref_g)
    open_clip = to_open_clip(sd_g)
    # The renaming above is the released one: diffusers' converter maps it back to transformers' names.
    back = convert_open_clip_checkpoint(ref_g, {k: torch.from_numpy(v) for k, v in open_clip.items()}, prefix=G_PREFIX)
    assert set(back) == set(sd_g)
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), sd_g[k], err_msg=k)
    file_sd = {**{L_PREFIX + "text_model." + k: v for k, v in sd_l.items()}, **open_clip,
               L_PREFIX + "text_model.embeddings.position_ids": np.arange(77)[None],
               "model.diffusion_model.out.2.bias": np.zeros(4, np.float32)}
    path = str(tmp_path / "sdxl.safetensors")
    save_state_dict(path, file_sd)
    text = sdxl.load_single_file_text_encoders(path, text_config=TINY_L, text_config_2=TINY_G)
    assert text.eos_token_id_2 == 2 and text.force_zeros_for_empty_prompt
    want = {"text_encoder": convert_clip_text(sd_l, sdxl_text_shapes(TINY_L)),
            "text_encoder_2": convert_clip_text(sd_g, sdxl_text_shapes(TINY_G))}
    jax.tree.map(np.testing.assert_array_equal, text.params, want)
    # And so the outputs are transformers' too.
    ids = tokenize(tokenizers[1], PROMPTS[:2])
    with torch.no_grad():
        ref_out = ref_g(torch.from_numpy(ids), output_hidden_states=True)
    hidden, embeds = text.models()[1].apply({"params": text.params["text_encoder_2"]}, jnp.asarray(ids))
    assert_close(hidden, ref_out.hidden_states[-2].numpy(), what="single-file bigG hidden")
    assert_close(embeds, ref_out.text_embeds.numpy(), what="single-file bigG text_embeds")


def test_single_file_errors_name_the_files_keys(tokenizers):
    _, _, vocab = tokenizers
    open_clip = to_open_clip(np_state_dict(hf_text(TINY_G, vocab, 2, seed=7)))
    d = TINY_G.hidden_size

    def convert(sd):
        return sdxl.convert_sgm_text_encoders(sd, TINY_L, TINY_G, what="x.safetensors")

    bias = G_PREFIX + "transformer.resblocks.1.attn.in_proj_bias"
    with pytest.raises(CheckpointError, match=rf"missing keys: {bias} \({3 * d},\)"):
        convert({k: v for k, v in open_clip.items() if k != bias})
    w = G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(CheckpointError, match=rf"{w}: the file has \({d}, {d}\), the model needs \({3 * d}, {d}\)"):
        convert({**open_clip, w: np.zeros((d, d), np.float32)})
    extra = G_PREFIX + "transformer.resblocks.9.ln_1.weight"
    with pytest.raises(CheckpointError, match=rf"unexpected keys: {extra} \({d},\)"):
        convert({**open_clip, extra: np.zeros(d, np.float32)})
    with pytest.raises(CheckpointError, match=r"shape mismatches .* for another model size"):
        sdxl.convert_sgm_text_encoders(open_clip, TINY_L, dataclasses.replace(TINY_G, hidden_size=64))
    with pytest.raises(CheckpointError, match=r"missing keys: conditioner\.embedders\.0\.transformer\.text_model\."
                                              r"final_layer_norm\.bias"):
        sd_l = np_state_dict(hf_text(TINY_L, vocab, 2, seed=8))
        convert({L_PREFIX + "text_model." + k: v for k, v in sd_l.items() if k != "final_layer_norm.bias"})


def test_single_file_without_text_encoders_needs_a_base(tmp_path, sdxl_pair):
    _, base = sdxl_pair
    path = str(tmp_path / "unet_only.safetensors")
    save_state_dict(path, {"model.diffusion_model.out.2.bias": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"has no text_encoder weights \(conditioner\.embedders\.0"):
        sdxl.load_single_file_text_encoders(path, text_config=TINY_L, text_config_2=TINY_G)
    text = sdxl.load_sdxl_text(path, base=base)
    assert text.params is not base.params and text.params["text_encoder_2"] is base.params["text_encoder_2"]
    assert text.tokenizer_2_path == base.tokenizer_2_path


def test_diffusers_folder_with_fp16_variant(tmp_path, tokenizers):
    """`text_encoder/` in full precision, `text_encoder_2/` only as the fp16 variant, both tokenizers and
    model_index.json (the refiner's `force_zeros_for_empty_prompt: false`)."""
    import shutil

    tok, tok2, vocab = tokenizers
    ref_l, ref_g = hf_text(TINY_L, vocab, 2, seed=9), hf_text(TINY_G, vocab, 2, seed=10)
    root = tmp_path / "sdxl"
    ref_l.save_pretrained(root / "text_encoder")
    ref_g.half().save_pretrained(root / "text_encoder_2", variant="fp16")
    assert sorted(os.listdir(root / "text_encoder_2")) == ["config.json", "model.fp16.safetensors"]
    shutil.copytree(tok, root / "tokenizer")
    shutil.copytree(tok2, root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                        "force_zeros_for_empty_prompt": False}))
    text = sdxl.load_sdxl_text(root)
    assert (text.text_config, text.text_config_2, text.eos_token_id_2) == (TINY_L, TINY_G, 2)
    assert not text.force_zeros_for_empty_prompt
    assert text.tokenizer_2_path == str(root / "tokenizer_2")
    assert Tokenizer(text.tokenizer_2_path)("the cat")[0, -1] == vocab["!"]
    jax.tree.map(np.testing.assert_array_equal, text.params["text_encoder"],
                 convert_clip_text(np_state_dict(ref_l), sdxl_text_shapes(TINY_L)))
    half = {k: v.astype(np.float32) for k, v in np_state_dict(ref_g).items()}
    jax.tree.map(np.testing.assert_array_equal, text.params["text_encoder_2"],
                 convert_clip_text(half, sdxl_text_shapes(TINY_G)))
    # The two folders swapped: named as what they are.
    (root / "text_encoder" / "config.json").write_text((root / "text_encoder_2" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"a CLIPTextModelWithProjection, but SDXL's text_encoder is a CLIPTextModel"):
        sdxl.load_sdxl_text(root)


# ------------------------------------------------------------------------ the released layout


def test_released_sdxl_text_layout():
    """Real sizes, no weights: transformers' bigG `CLIPTextModelWithProjection` (built on the meta device) is
    exactly our `SDXLTextEncoder(sdxl_g())` tree, its OpenCLIP naming is exactly `open_clip_text_shapes`,
    and a file of that layout (zero-stride tensors; + logit_scale, and ViT-L with position_ids) converts
    with no missing or unexpected key."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    g, vit_l = CLIPTextConfig.sdxl_g(), CLIPTextConfig.sd15()
    assert (g.vocab_size, g.hidden_size, g.intermediate_size, g.num_layers, g.num_heads, g.hidden_act,
            g.projection_dim) == (49408, 1280, 5120, 32, 20, "gelu", 1280)
    with torch.device("meta"):
        hf_g = CLIPTextModelWithProjection(HFConfig(**g.transformers_kwargs()))
        hf_l = CLIPTextModel(HFConfig(**vit_l.transformers_kwargs()))
    for cfg, hf in ((g, hf_g), (vit_l, hf_l)):
        want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        flat = jax.tree_util.tree_flatten_with_path(sdxl_text_shapes(cfg))[0]
        ours = {}
        for path, leaf in flat:
            names = tuple(p.key for p in path)
            ours[torch_key(names)] = torch_shape(names[-1], leaf.shape)
        if cfg is vit_l:  # transformers 5's CLIPTextModel keeps no `text_model.` prefix in memory
            ours = {k.removeprefix("text_model."): s for k, s in ours.items()}
        assert ours == want
    g_shapes = {k: tuple(v.shape) for k, v in hf_g.state_dict().items()}
    zeros = {k: np.broadcast_to(np.float16(0), s) for k, s in g_shapes.items()}
    released = {k: np.shape(v) for k, v in to_open_clip(zeros, prefix="").items()}
    assert released == {**sdxl.open_clip_text_shapes(g), "logit_scale": ()}
    assert len(released) == 32 * 12 + 6

    file_g = {G_PREFIX + k: np.broadcast_to(np.float16(0), s) for k, s in released.items()}
    sd, _ = sdxl.open_clip_to_transformers(file_g, g)
    assert {k: v.shape for k, v in sd.items()} == g_shapes
    # (float16: 1.4 GB instead of 2.8 GB for the converted bigG params)
    params = torch_to_flax(sd, sdxl_text_shapes(g), what="released bigG layout", dtype=np.float16)
    assert jax.tree.structure(params) == jax.tree.structure(sdxl_text_shapes(g))
    del params, sd
    file_l = {L_PREFIX + "text_model." + k: np.broadcast_to(np.float32(0), v.shape)
              for k, v in hf_l.state_dict().items()}
    file_l[L_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77)[None]
    out = sdxl.convert_sgm_text_encoders(file_l)
    assert set(out) == {"text_encoder"}

"""SDXL kohya LoRAs: the SGM UNet's names (`input_blocks_*`, `middle_block_*`, `output_blocks_*`, resnets'
`in_layers_2` ...) and the two text encoders (`lora_te1_`, `lora_te2_`), merged exactly as torch merges them by
hand, and as diffusers' `StableDiffusionXLPipeline.load_lora_weights` reads the same file.

The SGM names below are written out for the tiny SDXL UNet (1 layer per block: input block `1 + 2 x level +
layer`, the downsampler after it, output block `2 x level + layer`, the upsampler as its third part): they are
the test's own table, not computed by the code under test.
"""

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_lora import merged_torch, modules, random_factors
from torch_refs import randomize, unet2d_kwargs

from animatediff_jax.checkpoints.load import load_lora
from animatediff_jax.checkpoints.lora_formats import read_lora_file
from animatediff_jax.checkpoints.sd15 import convert_clip_text, convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError, save_state_dict
from animatediff_jax.lora import merge
from animatediff_jax.models.clip_text import CLIPTextConfig
from animatediff_jax.models.config import tiny_sdxl_unet
from animatediff_jax.models.shapes import sdxl_text_shapes, unet_shapes

BASE = tiny_sdxl_unet(None)
SGM = {  # diffusers module -> kohya's SGM name (tiny SDXL UNet: levels 32/64/128, 1 layer per block)
    "conv_in": "input_blocks_0_0",
    "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_3_0_skip_connection",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_3_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_4_0_op",
    "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2": "input_blocks_5_1_transformer_blocks_1_ff_net_2",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_out.0": "output_blocks_1_1_transformer_blocks_1_attn2_to_out_0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_1_2_conv",
    "up_blocks.1.resnets.1.conv2": "output_blocks_3_0_out_layers_3",
    "up_blocks.2.resnets.0.conv_shortcut": "output_blocks_4_0_skip_connection",
}
# (transformers 5 holds CLIPTextModel's without `text_model.` in memory; files say `text_model_encoder_...`)
TEXT = {"lora_te1_": "encoder.layers.0.self_attn.q_proj", "lora_te2_": "encoder.layers.1.mlp.fc1"}


def _text_models():
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    t1 = CLIPTextConfig.tiny()
    t2 = CLIPTextConfig(vocab_size=1000, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                        hidden_act="gelu", projection_dim=24)
    ids = dict(bos_token_id=998, eos_token_id=999, pad_token_id=999)
    clip1 = randomize(CLIPTextModel(HFConfig(**t1.transformers_kwargs(), **ids)), seed=41)
    clip2 = randomize(CLIPTextModelWithProjection(HFConfig(**t2.transformers_kwargs(), **ids)), seed=42)
    return (t1, clip1), (t2, clip2)


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(params).items() if k[-1] == "kernel"}


def test_sdxl_kohya_lora_merges_like_torch_and_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(BASE)), seed=40)
    (t1, clip1), (t2, clip2) = _text_models()
    rank, alpha = 2, 3.0
    factors = random_factors({n: m for n, m in modules(unet2d, _exact(SGM)).items()}, rank, 43)
    assert factors.keys() == SGM.keys()
    text_factors = {p: random_factors(modules(m, _exact([n, "text_model." + n])), rank, 44 + i)
                    for i, (p, n, m) in enumerate((("lora_te1_", TEXT["lora_te1_"], clip1),
                                                   ("lora_te2_", TEXT["lora_te2_"], clip2)))}
    sd = {}
    for key, (down, up) in [(f"lora_unet_{SGM[n]}", f) for n, f in factors.items()] + \
            [(p + "text_model_" + n.removeprefix("text_model.").replace(".", "_"), f) for p, fs in text_factors.items() for n, f in fs.items()]:
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.numpy(), up.numpy()
        sd[f"{key}.alpha"] = np.float32(alpha)
    save_state_dict(tmp_path / "sdxl_lora.safetensors", sd)

    unet_p = convert_unet_state_dict(unet2d.state_dict(), BASE)
    text_p = [convert_clip_text({k: v.numpy() for k, v in m.state_dict().items()}, sdxl_text_shapes(c))
              for c, m in ((t1, clip1), (t2, clip2))]
    lf = read_lora_file(tmp_path / "sdxl_lora.safetensors", unet_shapes(BASE), sdxl_text_shapes(t1), sdxl_text_shapes(t2))
    assert lf.naming == "kohya"
    loaded = load_lora(tmp_path / "sdxl_lora.safetensors", "lora", base=BASE, text_config=t1, text_config_2=t2)
    assert (loaded.source, loaded.text_config_2) == ("kohya", t2)
    for a, b in ((loaded.unet, lf.unet), (loaded.text_encoder, lf.text_encoder), (loaded.text_encoder_2, lf.text_encoder_2)):
        assert flatten_dict(a).keys() == flatten_dict(b).keys()
    ours = [_flat(merge(p, t)) for p, t in ((unet_p, lf.unet), (text_p[0], lf.text_encoder),
                                            (text_p[1], lf.text_encoder_2))]

    # By hand: W += alpha / r * up @ down on the torch models, converted the same way.
    s = alpha / rank
    hand = [convert_unet_state_dict(merged_torch(unet2d, factors, s).state_dict(), BASE)]
    hand += [convert_clip_text({k: v.numpy() for k, v in merged_torch(m, text_factors[p], s).state_dict().items()},
                               sdxl_text_shapes(c)) for p, (c, m) in (("lora_te1_", (t1, clip1)), ("lora_te2_", (t2, clip2)))]
    before = [_flat(unet_p), _flat(text_p[0]), _flat(text_p[1])]
    for got, want, old, what in zip(ours, map(_flat, hand), before, ("UNet", "text encoder", "text encoder 2")):
        assert got.keys() == want.keys()
        changed = [k for k in want if not np.array_equal(want[k], old[k])]
        assert len(changed) == (len(SGM) if what == "UNet" else 1), what
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{what} {k}")

    # diffusers reads the UNet's layers of the same file onto the same kernels. (Its SDXL kohya path fails on the
    # text-encoder keys of this file in diffusers 0.42.1, "Could not automatically infer state dict type": those
    # are checked against the hand merge above only.)
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    save_state_dict(tmp_path / "unet_only.safetensors", {k: v for k, v in sd.items() if k.startswith("lora_unet_")})
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip1, text_encoder_2=clip2, tokenizer=None,
                                     tokenizer_2=None, unet=unet2d, scheduler=DDIMScheduler())
    pipe.load_lora_weights(str(tmp_path / "unet_only.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    theirs = _flat(convert_unet_state_dict(pipe.unet.state_dict(), BASE))
    assert sum(not np.array_equal(theirs[k], before[0][k]) for k in theirs) == len(SGM)
    for k in theirs:
        np.testing.assert_allclose(ours[0][k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=f"vs diffusers: {k}")


def _exact(names):
    import re

    return re.compile("^(" + "|".join(re.escape(n) for n in names) + ")$")


def test_te2_layers_need_the_second_text_encoder(tmp_path):
    """A SDXL LoRA's `lora_te2_` layers read without SDXL's second text encoder: one error naming them."""
    sd = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 32), np.float32),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((64, 2), np.float32)}
    save_state_dict(tmp_path / "te2.safetensors", sd)
    with pytest.raises(CheckpointError, match="text-encoder-2 layers, but no text-encoder-2 model"):
        load_lora(tmp_path / "te2.safetensors", "lora", base=BASE, text_config=CLIPTextConfig.tiny())

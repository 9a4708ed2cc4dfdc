"""LoRA: one merge mechanism, and the MotionLoRA / domain adapter / kohya file formats.

References: the torch model with `W += scale * alpha / r * up @ down` merged into its weights
by hand (the original AnimateDiff's rule), and, where diffusers reads the format, diffusers'
own loader (`AnimateDiffPipeline.load_lora_weights`, `StableDiffusionPipeline`'s kohya path;
these need `peft`). LoRA files are written here from torch module names with plain string
rules, independent of the readers under test.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict
from torch_refs import motion_adapter_kwargs, patch_to_original, randomize, run_unet3d, unet2d_kwargs

from animatediff_jax.checkpoints.load import load_lora
from animatediff_jax.checkpoints.lora_formats import (
    save_lora_diffusers,
    save_lora_kohya,
    save_lora_original,
)
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.checkpoints.torch_io import CheckpointError, load_state_dict, save_state_dict, torch_module_path
from animatediff_jax.lora import (
    domain_adapter_targets,
    init_lora,
    lora_layers,
    merge,
    merge_many,
    motion_lora_targets,
)
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import unet_shapes
from animatediff_jax.models.unet import UNet3D

FRAMES = 4
CFG = tiny_unet("v2")
MOTION_ATTN = re.compile(r"motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0)$")
SPATIAL_ATTN = re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0)$")


# ----------------------------------------------------------------- torch side


def diffusers_pipeline(unet):
    """An AnimateDiffPipeline around a given (randomized) UNetMotionModel, no VAE / text encoder."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    pipe = AnimateDiffPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=UNet2DConditionModel(**unet2d_kwargs(CFG)),
        motion_adapter=MotionAdapter(**motion_adapter_kwargs(CFG)),
        scheduler=DDIMScheduler(),
    )
    pipe.unet = copy.deepcopy(unet)
    return pipe


@pytest.fixture(scope="module")
def ref_unet():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(**unet2d_kwargs(CFG))
    return randomize(UNetMotionModel.from_unet2d(unet, MotionAdapter(**motion_adapter_kwargs(CFG))), seed=21)


def modules(model, pattern) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if pattern.search(n)}


def random_factors(mods: dict, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module name: (down (r, in[, kh, kw]), up (out, r[, 1, 1]))}` in torch layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in mods.items():
        w = m.weight
        kernel = w.shape[2:]
        down = torch.randn((rank, w.shape[1]) + tuple(kernel), generator=g) * 0.3
        up = torch.randn((w.shape[0], rank) + (1,) * len(kernel), generator=g) * 0.3
        out[name] = (down, up)
    return out


def merged_torch(model, factors: dict, scales: dict | float):
    """A copy of `model` with `W += scale * up @ down` (conv: over the flattened kernel) merged by hand."""
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (down, up) in factors.items():
            w = mods[name].weight
            s = scales[name] if isinstance(scales, dict) else scales
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            w += s * delta.reshape(w.shape)
    return model


def run_torch(unet, x, t, ctx) -> np.ndarray:
    unet = patch_to_original(copy.deepcopy(unet), CFG, FRAMES)
    with torch.no_grad():
        return unet(x, t, ctx.repeat_interleave(FRAMES, 0)).sample.numpy()


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, 4, FRAMES, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 16, generator=g)


def run_ours(params, x, t, ctx) -> np.ndarray:
    return run_unet3d(CFG, params, x, t, ctx)


def original_name(name: str) -> str:
    """A diffusers module name -> original AnimateDiff LoRA stem (plain string rules)."""
    if "motion_modules" in name:  # spatial layers keep attn1/attn2 (the v3 domain adapter's naming)
        name = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", name)
        name = name.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
    stem, proj = name.rsplit(".to_", 1)
    return f"{stem}.processor.to_{'out' if proj == 'out.0' else proj}_lora"


def original_file(factors) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in factors.items():
        sd[f"{original_name(name)}.down.weight"], sd[f"{original_name(name)}.up.weight"] = down, up
    return sd


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), "/".join(k)


# ----------------------------------------------------------------- mechanism


def test_init_lora_targets_and_identity(ref_unet):
    """init_lora selects exactly the torch attention projections; up=0 leaves the weights unchanged."""
    shapes = unet_shapes(CFG)
    for targets, pattern in ((motion_lora_targets, MOTION_ATTN), (domain_adapter_targets, SPATIAL_ATTN)):
        tree = init_lora(shapes, targets, 4, jax.random.key(0))
        expected = {torch_module_path(n + ".weight")[0] for n in modules(ref_unet, pattern)}
        assert set(lora_layers(tree)) == expected and len(expected) >= 8
        layers = lora_layers(tree).values()
        downs = np.concatenate([np.asarray(layer["down"]).ravel() for layer in layers])
        assert abs(downs.std() - 1 / 4) < 0.02 and not any(np.asarray(layer["up"]).any() for layer in layers)
    params = convert_unet_state_dict(ref_unet.state_dict(), CFG)
    assert_trees_equal(jax.tree.map(np.asarray, merge(params, tree, 1.7)), params)


def test_motion_lora_original_runtime_and_merged(ref_unet, tmp_path):
    """Original MotionLoRA .ckpt; scale traced inside jit (no recompile) == merged outside == torch."""
    factors = random_factors(modules(ref_unet, MOTION_ATTN), rank=2, seed=1)
    torch.save({"state_dict": original_file(factors)}, tmp_path / "v2_lora_ZoomIn.ckpt")
    tree = load_lora(tmp_path / "v2_lora_ZoomIn.ckpt", "motion_lora", base=CFG).unet
    params = convert_unet_state_dict(ref_unet.state_dict(), CFG)
    x, t, ctx = inputs()

    traces = []

    @jax.jit
    def runtime(p, lora, scale, x, t, ctx):
        traces.append(1)
        return UNet3D(CFG).apply({"params": merge(p, lora, scale)}, x, t, ctx)

    xj = jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy())
    for scale in (0.8, -0.5):
        ref = run_torch(merged_torch(ref_unet, factors, scale), x, t, ctx)
        merged = run_ours(merge(params, tree, scale), x, t, ctx)
        rt = np.asarray(runtime(params, tree, scale, xj, t.numpy(), ctx.numpy())).transpose(0, 4, 1, 2, 3)
        err = assert_close(merged, ref, rtol=1e-5, what=f"merged motion LoRA at {scale}")
        assert_close(rt, merged, rtol=1e-6, what="run-time vs merged")
        gap = np.abs(rt - merged).max()
        print(f"motion LoRA (original file) scale {scale}: max abs err {err:.2e}, run-time vs merged {gap:.1e}")
    assert len(traces) == 1, "changing the traced scale recompiled"
    assert np.abs(ref - run_torch(ref_unet, x, t, ctx)).max() > 1e-3  # the LoRA changes the output

    # Two MotionLoRAs, each with its own weight.
    factors2 = random_factors(modules(ref_unet, MOTION_ATTN), rank=3, seed=2)
    torch.save(original_file(factors2), tmp_path / "second.ckpt")
    tree2 = load_lora(tmp_path / "second.ckpt", "motion_lora", base=CFG).unet
    both = merged_torch(merged_torch(ref_unet, factors, 0.6), factors2, -0.4)
    ours = run_ours(merge_many(params, [(tree, 0.6), (tree2, -0.4)]), x, t, ctx)
    err = assert_close(ours, run_torch(both, x, t, ctx), rtol=1e-5, what="two motion LoRAs")
    print(f"merge_many (two MotionLoRAs): max abs err {err:.2e}")


def test_motion_lora_diffusers_formats(ref_unet, tmp_path):
    """PEFT naming (alpha in the metadata header) and the hub's old naming == diffusers' load_lora_weights."""
    factors = random_factors(modules(ref_unet, MOTION_ATTN), rank=2, seed=4)
    peft = {}
    old = {}
    for name, (down, up) in factors.items():
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
        stem = re.sub(r"\.to_(q|k|v|out\.0)$", lambda m: f".processor.to_{m[1].replace('.0', '')}_lora", name)
        old[f"unet.{stem}.down.weight"], old[f"unet.{stem}.up.weight"] = down, up
    meta = {"unet.r": 2, "unet.lora_alpha": 4, "unet.target_modules": sorted(factors)}
    header = {"lora_adapter_metadata": json.dumps(meta)}
    save_state_dict(tmp_path / "peft.safetensors", {k: v.numpy() for k, v in peft.items()}, header)
    save_state_dict(tmp_path / "old.safetensors", {k: v.numpy() for k, v in old.items()})

    params = convert_unet_state_dict(ref_unet.state_dict(), CFG)
    x, t, ctx = inputs()
    peft_tree = load_lora(tmp_path / "peft.safetensors", "motion_lora", base=CFG).unet
    old_tree = load_lora(tmp_path / "old.safetensors", "motion_lora", base=CFG).unet
    assert all(float(layer["alpha"]) == 4.0 for layer in lora_layers(peft_tree).values())
    ours_peft = run_ours(merge(params, peft_tree), x, t, ctx)
    ours_old = run_ours(merge(params, old_tree, 0.7), x, t, ctx)
    err = assert_close(ours_peft, run_torch(merged_torch(ref_unet, factors, 2.0), x, t, ctx), what="PEFT alpha 4 r 2")
    assert_close(ours_old, run_torch(merged_torch(ref_unet, factors, 0.7), x, t, ctx), what="old naming at 0.7")
    print(f"motion LoRA (PEFT file) vs hand-merged torch: max abs err {err:.2e}")

    pytest.importorskip("peft")
    for name, mine, weight in (("peft", ours_peft, 1.0), ("old", ours_old, 0.7)):
        pipe = diffusers_pipeline(ref_unet)
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name="motion")
        pipe.set_adapters(["motion"], [weight])
        err = assert_close(mine, run_torch(pipe.unet, x, t, ctx), what=f"{name} vs diffusers load_lora_weights")
        print(f"motion LoRA ({name} naming) vs diffusers AnimateDiffPipeline.load_lora_weights: max abs err {err:.2e}")

    # Our writer's PEFT file (per-layer alphas in the header) reads the same in diffusers.
    tree = jax.tree.map(np.asarray, peft_tree)
    for i, layer in enumerate(lora_layers(tree).values()):
        layer["alpha"] = np.float32(1.0 + i % 3)
    save_lora_diffusers(tmp_path / "ours.safetensors", tree)
    pipe = diffusers_pipeline(ref_unet)
    pipe.load_lora_weights(str(tmp_path / "ours.safetensors"))
    err = assert_close(run_ours(merge(params, tree), x, t, ctx), run_torch(pipe.unet, x, t, ctx), what="our PEFT file")
    print(f"our PEFT writer (mixed alphas) read by diffusers: max abs err {err:.2e}")


def test_domain_adapter(ref_unet, tmp_path):
    """v3 domain adapter (spatial attn1/attn2, original naming, `animatediff_config` entry) at alpha 0.5."""
    factors = random_factors(modules(ref_unet, SPATIAL_ATTN), rank=4, seed=7)
    torch.save({"state_dict": original_file(factors), "animatediff_config": {"rank": 4}}, tmp_path / "adapter.ckpt")
    tree = load_lora(tmp_path / "adapter.ckpt", "domain_adapter", base=CFG).unet
    params = convert_unet_state_dict(ref_unet.state_dict(), CFG)
    x, t, ctx = inputs()
    ref = run_torch(merged_torch(ref_unet, factors, 0.5), x, t, ctx)
    err = assert_close(run_ours(merge(params, tree, 0.5), x, t, ctx), ref, what="domain adapter 0.5")
    print(f"domain adapter at 0.5: max abs err {err:.2e}")
    holds = r"adapter\.ckpt: no MotionLoRA in it: it holds a spatial LoRA \(a domain adapter"
    with pytest.raises(CheckpointError, match=holds):
        load_lora(tmp_path / "adapter.ckpt", "motion_lora", base=CFG)


# ----------------------------------------------------------------- kohya


KOHYA_UNET = re.compile(
    r"(attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.0\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))))$"
    r"|down_blocks\.0\.resnets\.0\.conv1$"
)
KOHYA_TEXT = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def kohya_file(unet2d, clip, alphas=(1.5, 3.0, 6.0), rank=3):
    """A kohya LoRA over every usual target (1x1 proj_in/out convs, a 3x3 LoCon conv, the text encoder).

    Layers take the `alphas` in turn. Returns the state dict and, per model,
    `{module name: (down, up)}` and `{module name: alpha / r}`.
    """
    sd, parts = {}, []
    for prefix, model, pattern, seed in (("lora_unet_", unet2d, KOHYA_UNET, 8), ("lora_te_", clip, KOHYA_TEXT, 9)):
        factors, scales = random_factors(modules(model, pattern), rank, seed), {}
        for i, (name, (down, up)) in enumerate(factors.items()):
            on_disk = name if prefix == "lora_unet_" or name.startswith("text_model.") else f"text_model.{name}"
            key = prefix + on_disk.replace(".", "_")  # (transformers 5 drops `text_model.` in memory only)
            alpha = alphas[i % len(alphas)]
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
            scales[name] = alpha / rank
        parts.append((factors, scales))
    return sd, parts


def test_kohya(tmp_path):
    """kohya LoRA (UNet + text encoder, 1x1 and 3x3 convs, alpha/r) == torch merged by hand (and diffusers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    from animatediff_jax.checkpoints.sd15 import convert_clip_text
    from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from animatediff_jax.models.shapes import clip_shapes

    base_cfg = tiny_unet(None)
    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(base_cfg)), seed=31)
    tcfg = CLIPTextConfig.tiny()
    ids_kw = dict(bos_token_id=tcfg.vocab_size - 2, eos_token_id=tcfg.vocab_size - 1, pad_token_id=tcfg.vocab_size - 1)
    clip = randomize(HFModel(HFConfig(**tcfg.transformers_kwargs(), **ids_kw)), seed=32)
    sd, ((uf, us), (tf, ts)) = kohya_file(unet2d, clip)
    save_state_dict(tmp_path / "lora.safetensors", {k: v.numpy() for k, v in sd.items()})
    assert any(v.ndim == 4 and v.shape[2:] == (3, 3) for v in sd.values())  # the LoCon conv is there
    assert any(v.ndim == 4 and v.shape[2:] == (1, 1) for v in sd.values())

    uparams = convert_unet_state_dict(unet2d.state_dict(), base_cfg)
    tparams = convert_clip_text({k: v.numpy() for k, v in clip.state_dict().items()}, clip_shapes(tcfg))
    lf = load_lora(tmp_path / "lora.safetensors", "lora", base=base_cfg, text_config=tcfg)
    assert lf.source == "kohya"

    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(FRAMES, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    ids = torch.randint(0, tcfg.vocab_size - 2, (2, 7), generator=g)
    video = jnp.asarray(x.permute(0, 2, 3, 1).numpy())[None]
    unet_fn = jax.jit(UNet3D(base_cfg).apply)
    clip_fn = jax.jit(CLIPTextModel(tcfg).apply)

    def ours(mult):
        u = unet_fn({"params": merge(uparams, lf.unet, mult)}, video, 400, ctx.numpy())
        c = clip_fn({"params": merge(tparams, lf.text_encoder, mult)}, ids.numpy())
        return np.asarray(u)[0].transpose(0, 3, 1, 2), np.asarray(c)

    def torch_out(u, c):
        with torch.no_grad():
            return u(x, 400, ctx.repeat(FRAMES, 1, 1)).sample.numpy(), c(ids).last_hidden_state.numpy()

    mult = 0.7
    hand_u = merged_torch(unet2d, uf, {n: mult * s for n, s in us.items()})
    hand_c = merged_torch(clip, tf, {n: mult * s for n, s in ts.items()})
    ref_u, ref_c = torch_out(hand_u, hand_c)
    ou, oc = ours(mult)
    eu = assert_close(ou, ref_u, what="kohya UNet")
    ec = assert_close(oc, ref_c, what="kohya text encoder")
    print(f"kohya at {mult}: UNet max abs err {eu:.2e}, text encoder {ec:.2e}")

    # diffusers' kohya path drops per-layer alphas that differ (its alpha_pattern keys keep the
    # `processor.to_q_lora.down.weight` spelling and match no module): compare on one alpha.
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd1, _ = kohya_file(unet2d, clip, alphas=(1.5,))
    save_state_dict(tmp_path / "one_alpha.safetensors", {k: v.numpy() for k, v in sd1.items()})
    lf = load_lora(tmp_path / "one_alpha.safetensors", "lora", base=base_cfg, text_config=tcfg)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=copy.deepcopy(clip),
        tokenizer=None,
        unet=copy.deepcopy(unet2d),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path / "one_alpha.safetensors"))
    ref_u, ref_c = torch_out(pipe.unet, pipe.text_encoder)
    ou, oc = ours(1.0)
    eu = assert_close(ou, ref_u, what="kohya UNet vs diffusers")
    ec = assert_close(oc, ref_c, what="kohya text encoder vs diffusers")
    print(f"kohya vs diffusers StableDiffusionPipeline.load_lora_weights: UNet {eu:.2e}, text encoder {ec:.2e}")

    # Round trip file -> tree -> file, bit for bit (fp16 file, as most are shipped).
    half = {k: v.numpy().astype(np.float16) for k, v in sd.items()}
    save_state_dict(tmp_path / "half.safetensors", half)
    lf16 = load_lora(tmp_path / "half.safetensors", "lora", base=base_cfg, text_config=tcfg)
    save_lora_kohya(tmp_path / "back.safetensors", lf16.unet, lf16.text_encoder, dtype=np.float16)
    back = load_state_dict(tmp_path / "back.safetensors")
    assert back.keys() == half.keys()
    assert all(back[k].dtype == half[k].dtype and np.array_equal(back[k], half[k]) for k in half)


# ----------------------------------------------------------------- round trips and errors


def rich_tree():
    """A LoRA tree with motion + spatial attention layers, a 1x1 proj_in and a 3x3 conv, random `up`s."""
    shapes = unet_shapes(CFG)
    targets = lambda p: motion_lora_targets(p) or domain_adapter_targets(p)
    tree = init_lora(shapes, targets, 3, jax.random.key(1))
    convs = {("down_blocks_0", "attentions_0", "proj_in"), ("down_blocks_0", "resnets_0", "conv1")}
    extra = init_lora(shapes, lambda p: p in convs, 2, jax.random.key(2))
    tree = jax.tree.map(np.asarray, {**tree, "down_blocks_0": {**tree["down_blocks_0"], **extra["down_blocks_0"]}})
    rng = np.random.default_rng(0)
    for layer in lora_layers(tree).values():
        layer["up"] = rng.standard_normal(layer["up"].shape).astype(np.float32)
    return tree


def test_round_trips(ref_unet, tmp_path):
    """tree -> file -> tree is bit-exact for the three writers (alphas, conv layouts, text encoder)."""
    tree = rich_tree()
    attn = jax.tree.map(lambda v: v, tree)
    attn["down_blocks_0"].pop("resnets_0")
    attn["down_blocks_0"]["attentions_0"].pop("proj_in")
    for name in ("orig.ckpt", "orig.safetensors"):
        save_lora_original(tmp_path / name, attn)
        assert_trees_equal(load_lora(tmp_path / name, "lora", base=CFG).unet, attn)
    assert load_lora(tmp_path / "orig.ckpt", "lora", base=CFG).source == "original AnimateDiff"
    keys = load_state_dict(tmp_path / "orig.ckpt")
    assert any(".temporal_transformer." in k and "attention_blocks.1.processor.to_out_lora.up" in k for k in keys)

    from animatediff_jax.models.clip_text import CLIPTextConfig
    from animatediff_jax.models.shapes import clip_shapes

    TCFG = CLIPTextConfig.tiny()
    text = jax.tree.map(np.asarray, init_lora(clip_shapes(TCFG), lambda p: p[-1] in ("q_proj", "fc2"), 2, jax.random.key(3)))
    with_alpha = jax.tree.map(lambda v: v, tree)
    for i, layer in enumerate(lora_layers(with_alpha).values()):
        if i % 2:
            layer["alpha"] = np.float32(0.25 * i)  # never the rank
    for writer, name in ((save_lora_diffusers, "d.safetensors"), (save_lora_kohya, "k.safetensors")):
        writer(tmp_path / name, with_alpha, text)
        lf = load_lora(tmp_path / name, "lora", base=CFG, text_config=TCFG)
        assert_trees_equal(lf.unet, with_alpha)
        assert_trees_equal(lf.text_encoder, text)
    sd = load_state_dict(tmp_path / "d.safetensors")
    short = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in sd.items()}
    assert short.keys() != sd.keys()  # the transformers-5 spelling (no `text_model.`) reads the same
    save_state_dict(tmp_path / "d5.safetensors", short)
    assert_trees_equal(load_lora(tmp_path / "d5.safetensors", "lora", base=CFG, text_config=TCFG).text_encoder, text)
    assert sd["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape == (2, 32, 1, 1)
    assert sd["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (2, 32, 3, 3)


def test_errors(ref_unet, tmp_path):
    """Unknown / unmatched keys, missing factors, wrong shapes, wrong kind, truncated: CheckpointError."""
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    d, u = np.zeros((2, 32), np.float32), np.zeros((32, 2), np.float32)

    def check(sd, pattern, name="bad.safetensors", **kw):
        save_state_dict(tmp_path / name, sd)
        with pytest.raises(CheckpointError, match=pattern):
            load_lora(tmp_path / name, "lora", base=CFG, **kw)

    unknown_layer = "lora_unet_down_blocks_0_attentions_0_nonexistent.lora_down.weight"
    check(
        {f"{good}.lora_down.weight": d, f"{good}.lora_up.weight": u, unknown_layer: d},
        r"(?s)bad\.safetensors \(kohya LoRA\).*naming no layer.*nonexistent",
    )
    check({f"{good}.hada_w1_a": d}, r"(?s)kohya LoRA.*no LoRA layout.*hada_w1_a")
    check({f"{good}.lora_down.weight": d}, r"(?s)no up factor")
    check(
        {f"{good}.lora_down.weight": np.zeros((2, 31), np.float32), f"{good}.lora_up.weight": u},
        r"(?s)do not fit.*\(32, 32\)",
    )
    check({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": d},
          r"text-encoder layers, but no text-encoder model was given to load them into: lora_te_text_model")
    torch.save(
        {"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(3)}, tmp_path / "mm.ckpt"
    )
    with pytest.raises(CheckpointError, match=r"mm\.ckpt: no LoRA in it: it holds a motion module"):
        load_lora(tmp_path / "mm.ckpt", "lora", base=CFG)
    bias = "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_B.bias"
    check({bias: u[0]}, r"(?s)diffusers LoRA.*lora_B\.bias")
    save_lora_kohya(tmp_path / "k.safetensors", rich_tree())
    data = (tmp_path / "k.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: cannot be read"):
        load_lora(tmp_path / "cut.safetensors", "lora", base=CFG)
    mixed = r"k\.safetensors: no domain adapter in it: it holds a LoRA on motion modules and spatial layers \(kohya"
    with pytest.raises(CheckpointError, match=mixed):
        load_lora(tmp_path / "k.safetensors", "domain_adapter", base=CFG)
    with pytest.raises(ValueError, match="does not fit the params"):
        merge(convert_unet_state_dict(ref_unet.state_dict(), CFG), {"conv_in": {"down": d, "up": u}})

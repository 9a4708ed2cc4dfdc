"""`animatediff-jax export`: our motion modules and LoRAs as the files PyTorch users load.

What is checked, against diffusers and against the original layouts (faked in the tests from
diffusers modules with plain string rules, as in test_motion_formats / test_lora):
- exported motion modules load with `MotionAdapter.from_pretrained` (nothing missing or
  unexpected) and `MotionAdapter.from_single_file(ckpt, config=folder)` (offline: the config is
  a local folder), hold key for key the original layout with `pe` tables [1, L, C] equal to
  PyTorch's, and `UNetMotionModel.from_unet2d(unet2d, adapter)` gives our UNet3D's output
  (original GroupNorm semantics via `patch_to_original`, and diffusers' own);
- PyTorch -> `convert` -> `export` -> PyTorch is bit-exact for every format;
- an exported MotionLoRA read by `AnimateDiffPipeline.load_lora_weights` changes diffusers'
  output as ours; original-format LoRAs merged by the original rule by hand, likewise;
- a file lacking the requested part is one error line naming what it holds; fp16 exports hold
  the fp16-rounded params.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import jax
import numpy as np
import pytest
import torch
from conftest import assert_close
from flax.traverse_util import flatten_dict, unflatten_dict
from test_lora import MOTION_ATTN, SPATIAL_ATTN, diffusers_pipeline, modules, random_factors
from test_motion_formats import fake_original
from torch_refs import motion_adapter_kwargs, patch_to_original, randomize, run_unet3d, unet2d_kwargs

from animatediff_jax.checkpoints import params_io
from animatediff_jax.checkpoints.load import load_lora, load_motion
from animatediff_jax.checkpoints.motion import merge_motion, position_table
from animatediff_jax.checkpoints.params_io import save_lora, save_motion
from animatediff_jax.checkpoints.sd15 import convert_unet_state_dict
from animatediff_jax.cli import main as cli
from animatediff_jax.lora import domain_adapter_targets, init_lora, lora_layers, merge, motion_lora_targets
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import motion_shapes, unet_shapes

FRAMES = 4
BASE = tiny_unet(None)
CFG = tiny_unet("v2")  # (test_lora's diffusers_pipeline is built for this layout)


# ----------------------------------------------------------------- helpers


def random_like(shapes, seed: int) -> dict:
    """Random params shaped like `shapes` (kernels ~ fan_in^-1/2, norms ~ 1, biases ~ 0.1): a trained module."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in flatten_dict(shapes).items():
        if path[-1] == "kernel":
            v = rng.standard_normal(s.shape) * np.prod(s.shape[:-1]) ** -0.5
        elif path[-1] == "scale":
            v = 1 + 0.1 * rng.standard_normal(s.shape)
        else:
            v = 0.1 * rng.standard_normal(s.shape)
        out[path] = v.astype(np.float32)
    return unflatten_dict(out)


def adapter_state_dict(cfg, seed: int) -> dict:
    from diffusers import MotionAdapter

    return randomize(MotionAdapter(**motion_adapter_kwargs(cfg)), seed=seed).state_dict()


def base_json(tmp_path) -> str:
    p = tmp_path / "base.json"
    p.write_text(json.dumps(dataclasses.asdict(BASE)))
    return str(p)


def run(argv, capsys=None) -> tuple[int, str]:
    if capsys is not None:
        capsys.readouterr()
    rc = cli([str(a) for a in argv])
    return rc, capsys.readouterr().err if capsys is not None else ""


def torch_out(model, cfg, x, t, ctx, original: bool = True) -> np.ndarray:
    model = copy.deepcopy(model)
    if original:
        patch_to_original(model, cfg, FRAMES)
    with torch.no_grad():
        return model(x, t, ctx.repeat_interleave(FRAMES, 0)).sample.numpy()


def inputs(cfg):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, cfg.in_channels, FRAMES, 8, 8, generator=g)
    return x, torch.tensor([321]), torch.randn(1, 5, cfg.cross_attention_dim, generator=g)


def torch_sd(path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, weights_only=True)
    return obj.get("state_dict", obj)


def assert_sd_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


def original_lora_file(factors) -> dict[str, torch.Tensor]:
    """LoRA factors in the original AnimateDiff naming: motion modules renamed (`temporal_transformer`,
    `attention_blocks.{0,1}`), spatial blocks keep `attn1`/`attn2` as the original UNet3D names them."""
    sd = {}
    for name, (down, up) in factors.items():
        if ".motion_modules." in name:
            name = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", name)
            name = name.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
        stem, proj = name.rsplit(".to_", 1)
        stem = f"{stem}.processor.to_{'out' if proj == 'out.0' else proj}_lora"
        sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up
    return sd


def from_original_name(key: str) -> str:
    """Original AnimateDiff LoRA key -> the diffusers module it adapts (plain string rules, as in test_lora)."""
    stem, proj = re.match(r"(.*)\.processor\.to_(q|k|v|out)_lora\.(?:down|up)\.weight$", key).groups()
    if ".temporal_transformer." in stem:
        stem = stem.replace(".temporal_transformer.", ".")
        stem = stem.replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
    return f"{stem}.to_{'out.0' if proj == 'out' else proj}"


def merge_original_by_hand(model, path, scale: float):
    """The original AnimateDiff rule on an exported original-format LoRA: `W += scale * up @ down`."""
    sd = torch_sd(path)
    factors = {}
    for k, v in sd.items():
        factors.setdefault(from_original_name(k), {})["down" if ".down." in k else "up"] = v.float()
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            mods[name].weight += scale * f["up"] @ f["down"]
    return model


@pytest.fixture(scope="module")
def ref_unet():
    """A randomized tiny v2 UNetMotionModel (the base the LoRAs adapt)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    unet = UNet2DConditionModel(**unet2d_kwargs(CFG))
    return randomize(UNetMotionModel.from_unet2d(unet, MotionAdapter(**motion_adapter_kwargs(CFG))), seed=41)


def test_position_table_is_torchs():
    """Exported `pe` buffers are PyTorch's tables bit for bit (XLA's exp/sin differ by ulps)."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    for length in (24, 32):
        for dim in (32, 320, 1280):
            ref = SinusoidalPositionalEmbedding(dim, length).pe[0].numpy()
            assert np.array_equal(position_table(length, dim), ref), (length, dim)


# ----------------------------------------------------------------- motion modules -> diffusers


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_motion_export_loads_in_diffusers(version, tmp_path, capsys):
    """Params file -> original .ckpt/.safetensors + MotionAdapter folder -> diffusers loads all, same UNet output."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    cfg = tiny_unet(version)
    motion = random_like(motion_shapes(cfg), seed={"v1": 1, "v2": 2, "v3": 3}[version])
    save_motion(tmp_path / "mm.safetensors", motion, cfg)
    for out, fmt in (("mm.ckpt", "original"), ("mm.safetensors", "original"), ("adapter", "diffusers")):
        target = tmp_path / "out" / out
        rc, err = run(["export", "motion", tmp_path / "mm.safetensors", "--out", target, "--format", fmt], capsys)
        assert rc == 0, err
        assert f"{version} layout" in err

    adapter, info = MotionAdapter.from_pretrained(tmp_path / "out" / "adapter", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    fresh = MotionAdapter(**motion_adapter_kwargs(cfg)).state_dict()
    reference = adapter.state_dict()
    assert reference.keys() == fresh.keys()
    pe = [k for k in fresh if k.endswith(".pe")]
    assert pe and all(torch.equal(reference[k], fresh[k]) for k in pe)  # PyTorch's own tables

    # The original layout, key for key: the renaming rules of test_motion_formats, two pe tables per block.
    expected = fake_original(reference)
    for name in ("mm.ckpt", "mm.safetensors"):
        sd = torch_sd(tmp_path / "out" / name)
        assert_sd_equal(sd, expected, name)
        length = 24 if version == "v1" else 32
        assert {tuple(v.shape[:2]) for k, v in sd.items() if k.endswith("pos_encoder.pe")} == {(1, length)}
        assert any(k.startswith("mid_block.motion_modules.") for k in sd) == (version == "v2")
        # from_single_file (offline: `config` is the local adapter folder): every key used, none left out.
        single = MotionAdapter.from_single_file(str(tmp_path / "out" / name), config=str(tmp_path / "out" / "adapter"))
        converted = convert_animatediff_checkpoint_to_diffusers(dict(sd))
        assert converted.keys() == {k for k in fresh if not k.endswith(".pe")}
        assert_sd_equal(single.state_dict(), reference, f"from_single_file({name})")

    unet2d = randomize(UNet2DConditionModel(**unet2d_kwargs(BASE)), seed=7)
    tm = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    params = merge_motion(convert_unet_state_dict(unet2d.state_dict(), BASE), motion, cfg)
    x, t, ctx = inputs(cfg)
    err = assert_close(run_unet3d(cfg, params, x, t, ctx), torch_out(tm, cfg, x, t, ctx), rtol=1e-5, what=version)
    # diffusers' own numerics (motion GroupNorm across frames, spatial per frame) are a config away.
    dcfg = cfg.replace(spatial_norm_per_frame=True, motion=dataclasses.replace(cfg.motion, norm_per_frame=False))
    err_d = assert_close(
        run_unet3d(dcfg, params, x, t, ctx), torch_out(tm, cfg, x, t, ctx, original=False), rtol=1e-5, what="diffusers"
    )
    print(f"{version} export -> UNetMotionModel: max abs err {err:.2e} (original norms), {err_d:.2e} (diffusers')")


# ----------------------------------------------------------------- round trips


def test_round_trips_bit_exact(ref_unet, tmp_path, capsys):
    """PyTorch -> convert -> export -> PyTorch, bit for bit, for every format."""
    from diffusers import MotionAdapter

    base = base_json(tmp_path)

    def round_trip(kind_args, src, out, export_args, name):
        converted = tmp_path / f"{name}.params.safetensors"
        rc, err = run(["convert", *kind_args, src, "--out", converted, "--base-config", base], capsys)
        assert rc == 0, err
        rc, err = run(["export", *export_args, converted, "--out", tmp_path / out], capsys)
        assert rc == 0, err
        return tmp_path / out

    # Original motion modules: v2 .ckpt (with the state_dict wrapper), v3 fp16 .safetensors.
    for version, src, dtype in (("v2", "v2.ckpt", torch.float32), ("v3", "v3.safetensors", torch.float16)):
        adapter = randomize(MotionAdapter(**motion_adapter_kwargs(tiny_unet(version))), seed=5)
        sd = {k: v.to(dtype) for k, v in fake_original(adapter.state_dict()).items()}
        if src.endswith(".ckpt"):
            torch.save({"state_dict": sd}, tmp_path / src)
        else:
            from safetensors.torch import save_file

            save_file(sd, str(tmp_path / src))
        dt = ["--dtype", "fp16"] if dtype == torch.float16 else []
        out = round_trip(["motion"], tmp_path / src, f"back_{src}", ["motion", *dt], version)
        assert_sd_equal(torch_sd(out), sd, src)

    # A MotionAdapter folder (v1: 24 positions) written by diffusers.
    adapter = randomize(MotionAdapter(**motion_adapter_kwargs(tiny_unet("v1"))), seed=6)
    adapter.save_pretrained(tmp_path / "adapter")
    out = round_trip(["motion"], tmp_path / "adapter", "back_adapter", ["motion", "--format", "diffusers"], "v1")
    assert_sd_equal(
        torch_sd(out / "diffusion_pytorch_model.safetensors"),
        torch_sd(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"),
        "MotionAdapter folder",
    )
    a, b = MotionAdapter.load_config(tmp_path / "adapter"), MotionAdapter.load_config(out)
    assert {k: v for k, v in a.items() if not k.startswith("_")} == {k: v for k, v in b.items() if not k.startswith("_")}

    # MotionLoRA, original (.ckpt, wrapped) and PEFT (.safetensors); the v3 domain adapter.
    factors = random_factors(modules(ref_unet, MOTION_ATTN), rank=2, seed=8)
    orig = original_lora_file(factors)
    torch.save({"state_dict": orig}, tmp_path / "motion_lora.ckpt")
    out = round_trip(["lora", "--kind", "motion_lora"], tmp_path / "motion_lora.ckpt", "back_motion_lora.ckpt",
                     ["motion-lora", "--format", "original"], "ml")
    assert_sd_equal(torch_sd(out), orig, "original MotionLoRA")

    peft = {}
    for name, (down, up) in factors.items():
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
    from safetensors.torch import save_file

    save_file(peft, str(tmp_path / "motion_lora_peft.safetensors"))
    out = round_trip(["lora", "--kind", "motion_lora"], tmp_path / "motion_lora_peft.safetensors",
                     "back_peft.safetensors", ["motion-lora", "--format", "diffusers"], "peft")
    assert_sd_equal(torch_sd(out), peft, "PEFT MotionLoRA")

    adapter_factors = random_factors(modules(ref_unet, SPATIAL_ATTN), rank=4, seed=9)
    orig = original_lora_file(adapter_factors)
    torch.save(orig, tmp_path / "v3_adapter.ckpt")
    out = round_trip(["lora", "--kind", "domain_adapter"], tmp_path / "v3_adapter.ckpt", "back_adapter.ckpt",
                     ["domain-adapter"], "da")
    assert_sd_equal(torch_sd(out), orig, "domain adapter")


# ----------------------------------------------------------------- LoRAs in diffusers


def random_lora(targets, rank: int, seed: int, alpha: float | None = None) -> dict:
    tree = jax.tree.map(np.asarray, init_lora(unet_shapes(CFG), targets, rank, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    for layer in lora_layers(tree).values():
        layer["up"] = (0.3 * rng.standard_normal(layer["up"].shape)).astype(np.float32)
        if alpha is not None:
            layer["alpha"] = np.float32(alpha)
    return tree


def test_motion_lora_export_in_diffusers(ref_unet, tmp_path, capsys):
    """Our MotionLoRA exported as PEFT -> `load_lora_weights` changes diffusers' output as ours; the
    original-format export merged by the original rule, likewise. Then the domain adapter."""
    pytest.importorskip("peft")
    tree = random_lora(motion_lora_targets, rank=2, seed=1, alpha=3.0)  # alpha / r = 1.5
    save_lora(tmp_path / "ml.safetensors", tree, "motion_lora", CFG)
    for out, fmt in (("ml_peft.safetensors", "diffusers"), ("ml_orig.ckpt", "original")):
        rc, err = run(["export", "motion-lora", tmp_path / "ml.safetensors", "--out", tmp_path / out,
                       "--format", fmt], capsys)
        assert rc == 0, err

    params = convert_unet_state_dict(ref_unet.state_dict(), CFG)
    x, t, ctx = inputs(CFG)
    base_out = torch_out(ref_unet, CFG, x, t, ctx)
    report = []  # (printed at the end: `run` reads and drops captured output)
    for weight in (1.0, 0.6):
        mine = run_unet3d(CFG, merge(params, tree, weight), x, t, ctx)
        pipe = diffusers_pipeline(ref_unet)
        pipe.load_lora_weights(str(tmp_path / "ml_peft.safetensors"), adapter_name="motion")
        pipe.set_adapters(["motion"], [weight])
        theirs = torch_out(pipe.unet, CFG, x, t, ctx)
        assert np.abs(theirs - base_out).max() > 1e-2  # the LoRA does change the output
        err = assert_close(mine, theirs, rtol=1e-5, what=f"PEFT export at {weight}")
        hand = torch_out(merge_original_by_hand(ref_unet, tmp_path / "ml_orig.ckpt", weight), CFG, x, t, ctx)
        err_o = assert_close(mine, hand, rtol=1e-5, what=f"original export at {weight}")
        report.append(f"MotionLoRA export at {weight}: vs diffusers load_lora_weights {err:.2e}, original rule {err_o:.2e}")

    # Domain adapter (spatial attention), original v3 layout, at the usual run-time scale.
    da = random_lora(domain_adapter_targets, rank=4, seed=2)
    save_lora(tmp_path / "da.safetensors", da, "domain_adapter", CFG)
    rc, err = run(["export", "domain-adapter", tmp_path / "da.safetensors", "--out", tmp_path / "da.ckpt"], capsys)
    assert rc == 0, err
    keys = torch_sd(tmp_path / "da.ckpt")
    assert all(re.search(r"\.attentions\.\d+\.transformer_blocks\.0\.attn[12]\.processor\.to_", k) for k in keys)
    hand = torch_out(merge_original_by_hand(ref_unet, tmp_path / "da.ckpt", 0.8), CFG, x, t, ctx)
    err = assert_close(run_unet3d(CFG, merge(params, da, 0.8), x, t, ctx), hand, rtol=1e-5, what="domain adapter")
    print("\n".join([*report, f"domain adapter export at 0.8 vs original rule: max abs err {err:.2e}"]))


# ----------------------------------------------------------------- fp16, errors


def test_fp16_export_holds_rounded_params(tmp_path, capsys):
    cfg = tiny_unet("v3")
    motion = random_like(motion_shapes(cfg), seed=9)
    save_motion(tmp_path / "mm.safetensors", motion, cfg)
    rounded = jax.tree.map(lambda v: v.astype(np.float16).astype(np.float32), motion)
    for out, fmt in (("mm16.safetensors", "original"), ("mm16.ckpt", "original"), ("ad16", "diffusers")):
        rc, err = run(["export", "motion", tmp_path / "mm.safetensors", "--out", tmp_path / out,
                       "--format", fmt, "--dtype", "fp16"], capsys)
        assert rc == 0, err
        weights = tmp_path / out / "diffusion_pytorch_model.safetensors" if fmt == "diffusers" else tmp_path / out
        sd = torch_sd(weights)
        assert {v.dtype for v in sd.values()} == {torch.float16}
        pe = [v for k, v in sd.items() if k.endswith(".pe")]
        assert all(torch.equal(v[0].float(), torch.from_numpy(position_table(32, v.shape[-1])).half().float())
                   for v in pe)
        back, _ = load_motion(tmp_path / out, cfg)
        a, b = flatten_dict(back), flatten_dict(rounded)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), out

    tree = random_lora(motion_lora_targets, rank=2, seed=3)
    save_lora(tmp_path / "ml.safetensors", tree, "motion_lora", CFG)
    # --dtype takes every name of animatediff_jax.dtypes for float16
    for out, fmt, name in (("ml16.safetensors", "diffusers", "float16"), ("ml16.ckpt", "original", "half"),
                           ("k16.safetensors", "kohya", "F16")):
        part = "lora" if fmt == "kohya" else "motion-lora"
        rc, err = run(["export", part, tmp_path / "ml.safetensors", "--out", tmp_path / out,
                       "--format", fmt, "--dtype", name], capsys)
        assert rc == 0 and "float16" in err, err
        assert {v.dtype for v in torch_sd(tmp_path / out).values()} == {torch.float16}
        back = load_lora(tmp_path / out, "motion_lora", base=CFG).unet
        a, b = flatten_dict(back), flatten_dict(jax.tree.map(lambda v: v.astype(np.float16).astype(np.float32), tree))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), out

    # bfloat16 (not an export dtype) and unknown names: one line naming the names it takes
    for name in ("bf16", "int8"):
        rc, err = run(["export", "motion-lora", tmp_path / "ml.safetensors", "--out", tmp_path / "x.ckpt",
                       "--dtype", name], capsys)
        assert rc == 2 and err.strip() == (f"error: --dtype={name!r}: expected one of float32, fp32, f32, full, "
                                           "float16, fp16, f16, half"), err
        assert not (tmp_path / "x.ckpt").exists()


def test_missing_part_errors(ref_unet, tmp_path, capsys):
    """Asking for a part the file lacks: exit 2 (bad input), one line naming what is missing and what the file holds."""
    motion = random_like(motion_shapes(CFG), seed=4)
    save_motion(tmp_path / "mm.safetensors", motion, CFG)
    save_lora(tmp_path / "ml.safetensors", random_lora(motion_lora_targets, 2, 5), "motion_lora", CFG)
    save_lora(tmp_path / "da.safetensors", random_lora(domain_adapter_targets, 2, 6), "domain_adapter", CFG)
    torch.save(original_lora_file(random_factors(modules(ref_unet, MOTION_ATTN), 2, 7)), tmp_path / "ml.ckpt")
    torch.save(fake_original(adapter_state_dict(CFG, 3)), tmp_path / "mm.ckpt")
    params_io.save_params(tmp_path / "sd.safetensors", {"unet": {"conv_in": {"kernel": np.zeros((3, 3, 4, 32))}}},
                          {"unet_config": BASE, "vae_config": {}, "text_config": {}})
    cases = [
        (["motion", "ml.safetensors"], r"ml\.safetensors: no motion module in it: it holds .*a MotionLoRA \(\d+ UNet"),
        (["domain-adapter", "mm.safetensors"], r"mm\.safetensors: no domain adapter in it: it holds .*a motion module \(v2"),
        (["motion-lora", "da.safetensors"], r"da\.safetensors: no MotionLoRA in it: it holds .*a domain adapter"),
        (["motion", "ml.ckpt"], r"ml\.ckpt: no motion module in it: it holds a MotionLoRA \(original AnimateDiff naming"),
        (["domain-adapter", "mm.ckpt"], r"mm\.ckpt: no domain adapter in it: it holds a motion module \(original"),
        (["motion-lora", "mm.ckpt"], r"mm\.ckpt: no MotionLoRA in it: it holds a motion module"),
        (["motion", "sd.safetensors"], r"sd\.safetensors: no motion module in it: it holds .*converted SD1\.5 model"),
    ]
    for (part, name), pattern in cases:
        rc, err = run(["export", part, tmp_path / name, "--out", tmp_path / "x.ckpt",
                       "--base-config", base_json(tmp_path)], capsys)
        assert rc == 2, (part, name)
        assert len(err.strip().splitlines()) == 1 and re.search("error: .*" + pattern, err), err
    rc, err = run(["export", "motion", tmp_path / "mm.safetensors", "--out", tmp_path / "x.safetensors",
                   "--format", "diffusers"], capsys)
    assert rc == 2 and "writes a MotionAdapter folder" in err
    assert not (tmp_path / "x.ckpt").exists()

    # Training's export convention (kind "lora" + stage) reads as that stage's kind.
    tree = random_lora(motion_lora_targets, 2, 8)
    params_io.save_params(tmp_path / "stage3.safetensors", {"unet": tree},
                          {"stage": "motion_lora", "kind": "lora", "step": 10, "unet_config": CFG})
    assert load_lora(tmp_path / "stage3.safetensors", "lora").kind == "motion_lora"
    rc, err = run(["export", "motion-lora", tmp_path / "stage3.safetensors", "--out", tmp_path / "s3.ckpt"], capsys)
    assert rc == 0, err
    rc, err = run(["export", "domain-adapter", tmp_path / "stage3.safetensors", "--out", tmp_path / "s.ckpt"], capsys)
    assert rc == 2 and "no domain adapter in it: it holds" in err and "MotionLoRA" in err
    m, c = load_motion(tmp_path / "mm.safetensors")
    assert c == CFG and jax.tree.all(jax.tree.map(np.array_equal, m, motion))



def test_a_module_for_another_model_size_names_base_config(tmp_path, capsys):
    """A tiny motion module (or MotionLoRA) exported without --base-config: the SD1.5 UNet assumed does
    not fit it. One short line that says so and names the option, not a key list; with the option, it exports."""
    torch.save(fake_original(adapter_state_dict(CFG, 9)), tmp_path / "mm.ckpt")
    rc, err = run(["export", "motion", tmp_path / "mm.ckpt", "--out", tmp_path / "out.ckpt"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "another model size (e.g. channels 32 vs 320)" in lines[0] and "pass --base-config" in lines[0], err
    assert len(lines[0]) - len(str(tmp_path)) < 300, (len(lines[0]), err)
    assert not (tmp_path / "out.ckpt").exists()
    rc, err = run(["export", "motion", tmp_path / "mm.ckpt", "--out", tmp_path / "out.ckpt",
                   "--base-config", base_json(tmp_path)], capsys)
    assert rc == 0, err

    tree = random_lora(motion_lora_targets, 2, 10)
    params_io.save_lora(tmp_path / "ml.safetensors", tree, "motion_lora", CFG)
    assert run(["export", "motion-lora", tmp_path / "ml.safetensors", "--out", tmp_path / "ml.ckpt"], capsys)[0] == 0
    rc, err = run(["export", "motion-lora", tmp_path / "ml.ckpt", "--out", tmp_path / "again.ckpt"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "another model size" in lines[0] and "pass --base-config" in lines[0], err
    print(lines[0])


# ----------------------------------------------------------------- one overwrite rule (io.fs.check_output)


def test_every_writer_shares_one_overwrite_rule(tmp_path, capsys):
    """`export`, `convert`, `evaluate` (and `prepare`, below): an existing output only with --overwrite (an
    empty folder is free), an input never, each refusal one line naming the path and the flag, before
    anything is read."""
    from animatediff_jax.io.fs import check_output
    from animatediff_jax.io.video import write_gif
    from animatediff_jax.prepare import resumable

    save_motion(tmp_path / "mm.safetensors", random_like(motion_shapes(CFG), seed=11), CFG)
    mm = tmp_path / "mm.safetensors"
    (tmp_path / "taken.ckpt").write_bytes(b"old")
    for argv in (["export", "motion", mm, "--out", tmp_path / "taken.ckpt"],
                 ["convert", "motion", mm, "--out", tmp_path / "taken.safetensors"]):
        (tmp_path / "taken.safetensors").write_bytes(b"old")
        rc, err = run(argv, capsys)
        assert rc == 2 and err == f"error: {argv[-1]}: exists; pass --overwrite to replace it\n", err
        rc, err = run(argv[:3] + ["--out", argv[2], "--overwrite"], capsys)  # the input itself: never
        assert rc == 2 and f"error: {mm}: is the input {mm}" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "taken.ckpt").read_bytes() == (tmp_path / "taken.safetensors").read_bytes() == b"old"
    rc, err = run(["convert", "motion", mm, "--out", tmp_path / "taken.safetensors", "--overwrite",
                   "--base-config", base_json(tmp_path)], capsys)
    assert rc == 0 and load_motion(tmp_path / "taken.safetensors")[1] == CFG, err  # (--overwrite: replaced)

    # evaluate: --out is checked before CLIP or any video is read (the default, metrics.json beside the
    # videos, is theirs: rewritten).
    write_gif(tmp_path / "v" / "0-a-cat.gif", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "m.json").write_text("{}")
    rc, err = run(["evaluate", "--clip", tmp_path / "no_clip", "--videos", tmp_path / "v", "--out", tmp_path / "m.json"],
                  capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'm.json'}: exists; pass --overwrite to replace it\n"
    rc, err = run(["evaluate", "--clip", tmp_path / "no_clip", "--videos", tmp_path / "v" / "0-a-cat.gif",
                   "--out", tmp_path / "v" / "0-a-cat.gif", "--overwrite"], capsys)
    assert rc == 2 and "is the input" in err, err

    # The helper: an empty folder is free; a new file inside an input folder is fine, a folder holding an
    # input (replacing it would remove the input) is refused.
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", (mm,))
    check_output(tmp_path / "sub" / "x", (tmp_path / "sub",))
    with pytest.raises(FileExistsError, match="is the input"):
        check_output(tmp_path, (mm,), overwrite=True)

    # prepare: an interrupted run's folder (its own files only, no index) resumes without --overwrite;
    # a complete cache or a folder holding anything else needs it.
    cache = tmp_path / "cache"
    cache.mkdir()
    assert not resumable(str(cache))  # (empty: free anyway)
    for name in ("null_text.npz", "shard-00000-of-00002.p000.array_record",
                 "shard-00000-of-00002.p000.array_record.done.json", "shard-00001-of-00002.p001.array_record.tmp"):
        (cache / name).write_bytes(b"")
    assert resumable(str(cache))
    (cache / "cache_info.json").write_text("{}")
    assert not resumable(str(cache))  # complete
    (cache / "cache_info.json").unlink()
    (cache / "notes.txt").write_text("mine")
    assert not resumable(str(cache))  # someone else's folder
    rc, err = run(["prepare", "--model", tmp_path / "no_model", "--csv", tmp_path / "rows.csv", "--videos",
                   tmp_path / "v", "--out", cache], capsys)
    assert rc == 2 and err == f"error: {cache}: exists; pass --overwrite to replace it\n", err

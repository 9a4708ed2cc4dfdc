"""Weight files that would silently give wrong results are refused in one line: NaN/Inf weights (a
diverged run: black videos), integer tensors where the model has float weights, pickles that hold
more than tensors (never executed, and no "weights_only=False" advice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from animatediff_jax.checkpoints.motion import save_motion_module_original
from animatediff_jax.checkpoints.params_io import save_motion
from animatediff_jax.checkpoints.torch_io import CheckpointError, load_state_dict, nonfinite_allowed, torch_to_flax
from animatediff_jax.cli import main as cli
from animatediff_jax.models.config import tiny_unet
from animatediff_jax.models.shapes import motion_shapes

CFG = tiny_unet("v2")


def motion(seed: int = 0, poison: float | None = None):
    rng = np.random.default_rng(seed)
    flat = {p: rng.standard_normal(s.shape).astype(np.float32) for p, s in flatten_dict(motion_shapes(CFG)).items()}
    if poison is not None:
        first = sorted(flat)[0]
        flat[first].flat[0] = poison
    return unflatten_dict(flat)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, capsys, poison):
    ckpt = tmp_path / "mm_nan.ckpt"
    save_motion_module_original(ckpt, motion(0, poison), CFG)
    rc = cli(["convert", "motion", str(ckpt), "--out", str(tmp_path / "mm.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "holds NaN/Inf in" in err[-1] and "--allow-nonfinite" in err[-1], err
    assert not (tmp_path / "mm.safetensors").exists()
    # Our own params files too (e.g. what a diverged training run exported), in `export`.
    params = tmp_path / "nan_params.safetensors"
    save_motion(params, motion(1, poison), CFG)
    rc = cli(["export", "motion", str(params), "--out", str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"{params}: holds NaN/Inf in" in err[-1], err
    rc = cli(["export", "motion", str(params), "--out", str(tmp_path / "out.ckpt"), "--allow-nonfinite"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning:" in err and "loading it anyway" in err, err
    with nonfinite_allowed():
        sd = load_state_dict(tmp_path / "out.ckpt")
    assert sum(not np.isfinite(v).all() for v in sd.values()) == 1


def test_integer_tensors_are_not_cast_to_weights():
    target = {"proj": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    sd = {"proj.weight": np.ones((2, 3), np.int64), "proj.bias": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError, match=r"proj\.weight is an integer tensor \(int64\) vs model proj/kernel"):
        torch_to_flax(sd, target, what="file.ckpt")
    sd["proj.weight"] = sd["proj.weight"].astype(np.float16)
    out = torch_to_flax(sd, target)
    np.testing.assert_array_equal(out["proj"]["kernel"], np.ones((3, 2), np.float32))


class Payload:
    def __reduce__(self):  # would run a command if unpickled without weights_only
        import os

        return (os.system, ("touch /tmp/animatediff_jax_pwned",))


def test_pickles_with_code_are_refused_without_running(tmp_path):
    import os

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert msg == f"{path}: refused: unsafe or not a checkpoint (a pickle holding more than tensors; " \
                  "only weights-only loading is allowed)", msg
    assert "weights_only=False" not in msg and not os.path.exists("/tmp/animatediff_jax_pwned")


def test_export_validates_every_lora_layer_against_its_config(tmp_path, capsys):
    """A converted MotionLoRA with a wrong-shaped `up`, or a layer missing a tensor: one error line, no file."""
    import jax

    from animatediff_jax.checkpoints import params_io
    from animatediff_jax.lora import init_lora, lora_layers, motion_lora_targets
    from animatediff_jax.models.shapes import unet_shapes

    tree = init_lora(unet_shapes(CFG), motion_lora_targets, 2, jax.random.key(0))
    tree = jax.tree.map(lambda x: np.asarray(x) + 0.1, tree)
    good = tmp_path / "ml.safetensors"
    params_io.save_lora(good, tree, "motion_lora", CFG)
    flat, meta = params_io.load_params(good)
    first = sorted(lora_layers(flat["unet"]))[0]
    for case in ("wrong_up", "missing_up"):
        bad = jax.tree.map(np.asarray, flat)
        node = bad["unet"]
        for k in first:
            node = node[k]
        if case == "wrong_up":
            node["up"] = np.zeros((2, node["up"].shape[-1] + 3), np.float32)
        else:
            del node["up"]
        path = tmp_path / f"{case}.safetensors"
        params_io.save_params(path, bad, {k: v for k, v in meta.items()})
        rc = cli(["export", "motion-lora", str(path), "--out", str(tmp_path / f"{case}.ckpt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {path}"), err
        assert "/".join(first) in err[0], err
        assert not (tmp_path / f"{case}.ckpt").exists()
        print(err[0])


def test_a_damaged_converted_base_is_named_as_the_base(tmp_path):
    """A converted SD1.5 folder whose params do not fit its own configs: the error names that file."""
    from animatediff_jax.checkpoints import params_io, sd15
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(str(tmp_path / "models"))
    base = paths["base_model"]
    tree, meta = params_io.load_params(f"{base}/{params_io.PARAMS_FILE}")
    tree["unet"]["conv_in"]["kernel"] = np.zeros((3, 3, 4, 7), np.float32)
    params_io.save_params(f"{base}/{params_io.PARAMS_FILE}", tree, meta)
    with pytest.raises(CheckpointError, match=r"(?s)params\.safetensors \(unet\) does not fit the model:.*conv_in/kernel"):
        sd15.load_converted(base)


# ------------------------------------------------------------------ files that do not fit, in their own words


def _break_three_ways(tmp_path, sd: dict, what: str, load, *, gone: str, reshaped: str, stray: str) -> list[str]:
    """`sd` (a released file's own tensors) with `gone` deleted, `reshaped` half as wide on its second
    axis (the input channels) and `stray` added. Each alone is one line naming the key exactly as the
    file does, shapes in the file's own layout (read off `sd`, not off any conversion); all three
    together, one line each under the header. Returns the lines of the three together."""
    from animatediff_jax.checkpoints.torch_io import save_state_dict

    assert gone in sd and reshaped in sd and stray not in sd
    old = tuple(sd[reshaped].shape)
    new = (old[0], old[1] // 2) + old[2:]
    wrong = np.zeros(new, np.float32)
    extra = np.zeros((3, 2), np.float32)
    problems = {  # in the order the message lists them
        "missing": f"missing keys: {gone} {tuple(sd[gone].shape)}",
        "stray": f"unexpected keys: {stray} (3, 2)",
        "reshaped": f"shape mismatches: {reshaped}: the file has {new}, the model needs {old}",
    }
    files = {
        "missing": {k: v for k, v in sd.items() if k != gone},
        "stray": {**sd, stray: extra},
        "reshaped": {**sd, reshaped: wrong},
        "all": {**{k: v for k, v in sd.items() if k != gone}, stray: extra, reshaped: wrong},
    }
    for name, broken in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_state_dict(path, broken)
        with pytest.raises(CheckpointError) as e:
            load(path)
        lines = str(e.value).splitlines()
        if name != "all":
            assert lines == [f"{path} ({what}) does not fit the model: {problems[name]}"], lines
    assert lines == [f"{path} ({what}) does not fit the model:"] + [f"  {p}" for p in problems.values()], lines
    return lines


def test_a_sparsectrl_file_that_does_not_fit_is_named_in_its_own_words(tmp_path):
    """A released-layout SparseCtrl file (diffusers' `SparseControlNetModel`, motion modules renamed to
    the original's `temporal_transformer` / `attention_blocks` names, as `v3_sd15_sparsectrl_rgb.ckpt`):
    keys named as in the file (not as converted), shapes in its PyTorch layout (1x1 convs (O, I, 1, 1))."""
    from test_controlnet import _host, to_original_sparsectrl, torch_control_model

    from animatediff_jax.checkpoints.controlnet import load_controlnet
    from animatediff_jax.models.controlnet import tiny_controlnet

    cfg = tiny_controlnet("rgb")
    sd = to_original_sparsectrl(_host(torch_control_model(cfg)), cfg)
    motion = "down_blocks.1.motion_modules.0.temporal_transformer"
    conv, linear = "controlnet_down_blocks.1.weight", f"{motion}.transformer_blocks.0.attention_blocks.0.to_q.weight"
    for reshaped in (conv, linear):
        lines = _break_three_ways(tmp_path, sd, "SparseCtrl single file", load_controlnet,
                                  gone=f"{motion}.proj_out.weight", reshaped=reshaped, stray=f"{motion}.extra.weight")
        print("\n".join(lines))
    assert np.ndim(sd[conv]) == 4  # (a 1x1 conv: its shapes are reported as (O, I, 1, 1))


def test_a_controlnet_ldm_file_that_does_not_fit_is_named_in_its_own_words(tmp_path):
    """ControlNet 1.x in LDM naming (`control_model.zero_convs.N.0`, renamed by diffusers' converter on
    reading): a missing weight is named after its bias, which the file holds."""
    from test_controlnet import _host, to_ldm, torch_control_model

    from animatediff_jax.checkpoints.controlnet import load_controlnet
    from animatediff_jax.models.controlnet import tiny_controlnet

    cfg = tiny_controlnet(conditioning_embedding_out_channels=(4, 8, 8, 16))  # (SD's hint net: see test_controlnet)
    sd = to_ldm(_host(torch_control_model(cfg)), cfg)
    lines = _break_three_ways(tmp_path, sd, "ControlNet LDM single file", load_controlnet,
                              gone="control_model.zero_convs.2.0.weight",
                              reshaped="control_model.zero_convs.1.0.weight",
                              stray="control_model.zero_convs.1.9.weight")
    print("\n".join(lines))


def test_a_motion_module_file_that_does_not_fit_is_named_in_its_own_words(tmp_path):
    """A released-layout motion module (diffusers' `MotionAdapter` renamed to the original naming, pe
    tables included, as `mm_sd_v15_v2.ckpt`): keys as in the file, shapes in its layout."""
    from diffusers import MotionAdapter
    from test_motion_formats import fake_original
    from torch_refs import motion_adapter_kwargs

    from animatediff_jax.checkpoints.load import load_motion

    adapter = MotionAdapter(**motion_adapter_kwargs(CFG))
    sd = fake_original({k: v.detach().numpy() for k, v in adapter.state_dict().items()})
    motion = "up_blocks.1.motion_modules.1.temporal_transformer"
    lines = _break_three_ways(
        tmp_path, sd, "original AnimateDiff motion module, v2", lambda p: load_motion(p, CFG),
        gone=f"{motion}.transformer_blocks.0.ff.net.2.weight",
        reshaped="down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight",
        stray=f"{motion}.transformer_blocks.0.attention_blocks.0.extra.weight")
    print("\n".join(lines))

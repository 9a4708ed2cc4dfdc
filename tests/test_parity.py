"""Tiny end-to-end parity with diffusers' `AnimateDiffPipeline` (PyTorch, CPU, fp32), stage by stage.

Same random weights (diffusers' modules converted to ours), same initial latents; our UNet uses
diffusers' motion-module GroupNorm semantics (`norm_per_frame=False`), see animatediff_jax/parity.py.
"""

import json

import pytest

from animatediff_jax import parity

RTOL, ATOL = 2e-5, 1e-5  # relative to each stage's reference scale, as conftest.assert_close


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    torch_pipe, tok = parity.build_random_pipeline("tiny", workdir=str(tmp_path_factory.mktemp("parity")))
    return torch_pipe, parity.ours_from_diffusers(torch_pipe, tok)


def check(stages):
    for name, d in stages.items():
        if name.startswith("_") or name == "frames uint8":
            continue
        assert d["ref_max_abs"] > 0, name
        assert d["max_abs"] <= ATOL + RTOL * d["ref_max_abs"], f"{name}: {d}"
    assert stages["frames uint8"]["max_abs"] <= 1  # a rounding flip at most
    assert stages["frames uint8"]["mean_abs"] < 0.01


@pytest.mark.parametrize(
    "options",
    [
        dict(scheduler="ddim", steps=5, guidance_scale=7.5, clip_skip=0),
        dict(scheduler="dpmpp_2m", steps=4, guidance_scale=1.0, clip_skip=1, num_frames=5),
        # AnimateDiff-Lightning's setup (configs/sample/lightning.py): Euler, trailing spacing, no CFG
        dict(scheduler="euler", steps=4, guidance_scale=1.0, clip_skip=0,
             scheduler_options={"preset": "diffusers_sd15", "timestep_spacing": "trailing", "beta_schedule": "linear"}),
    ],
    ids=["ddim-cfg", "dpmpp2m-nocfg-clipskip", "lightning-euler-trailing"],
)
def test_tiny_parity_with_animatediff_pipeline(pipes, options):
    torch_pipe, ours = pipes
    kw = dict(num_frames=6, height=16, width=16, decode_chunk=4)
    kw.update(options)
    lines = []
    stages = parity.run_parity(torch_pipe, ours, ["a cat and the dog", "the dog"], ["dog"], [3, 4],
                               log=lines.append, **kw)
    print("\n".join(lines))
    assert ("text embeddings (negative)" in stages) == (options["guidance_scale"] > 1)
    assert "norm_per_frame=False" in "\n".join(lines)
    check(stages)


def test_tiny_parity_with_chunked_attention(pipes, small_attention_blocks):
    """The whole sampler with the blockwise attention kernel in our UNet, against diffusers (SDPA)."""
    import dataclasses

    torch_pipe, ours = pipes
    chunked = dataclasses.replace(ours, attention="chunked")
    stages = parity.run_parity(torch_pipe, chunked, ["a cat and the dog"], ["dog"], [3], num_frames=4, height=16,
                               width=16, steps=3, guidance_scale=7.5, log=None)
    check(stages)


def test_cli_tiny(capsys, tmp_path):
    """`animatediff-jax parity --tiny` end to end (1 prompt, 2 steps), with a tolerance gate."""
    out = tmp_path / "parity.json"
    rc = parity.main(["--tiny", "--prompt", "the cat", "--steps", "2", "--frames", "3", "--tolerance", "1e-3",
                      "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "latents after loop" in text and "decoded frames" in text
    res = json.loads(out.read_text())
    assert res["unet output step 0 (guided)"]["max_abs"] < 1e-3


def test_stochastic_samplers_are_refused(pipes):
    torch_pipe, ours = pipes
    with pytest.raises(ValueError, match="deterministic"):
        parity.run_parity(torch_pipe, ours, ["the cat"], scheduler="euler_ancestral", steps=2, num_frames=2,
                          height=16, width=16, log=None)


def test_parity_is_a_command_of_the_cli(capsys):
    """`animatediff-jax parity` runs this module (beside the other commands, not under testing/)."""
    import importlib

    from animatediff_jax import cli

    assert importlib.import_module(cli.COMMANDS["parity"][0]) is parity
    with pytest.raises(SystemExit) as e:
        cli.main(["parity", "--help"])
    assert e.value.code == 0 and "animatediff-jax parity" in capsys.readouterr().out

"""The README's Python examples run as written, on the tiny random models (`testing.tiny`); its links
and the docs' resolve; its install-and-test lines are what `.ci/run` runs.

Each ```python block (README.md, docs/*.md) that imports `animatediff_jax` is executed with its
placeholder paths pointed at the tiny files and its sizes made CPU-sized; the variables an example
takes as given (`latents`, ...) are provided. Blocks for PyTorch users (diffusers) are left to
`test_export`, which does the same with diffusers' own loaders.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from animatediff_jax.testing.tiny import write_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DOCS = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def python_blocks(names=("README.md",) + tuple(d for d in DOCS if d.startswith("docs"))) -> list[str]:
    blocks = [b for name in names for b in re.findall(r"^```python\n(.*?)^```", read(name), re.S | re.M)]
    return [b for b in blocks if "animatediff_jax" in b]


def test_readme_has_examples():
    assert len(python_blocks(("README.md",))) >= 2


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens (repeats get -1, -2...)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out: set[str] = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in out:
            n += 1
            unique = f"{slug}-{n}"
        out.add(unique)
    return out


@pytest.mark.parametrize("name", DOCS)
def test_links_resolve(name):
    """Every relative link of the page names a file of this repository, and its #anchor a heading there."""
    text = re.sub(r"^```.*?^```", "", read(name), flags=re.S | re.M)
    here = os.path.dirname(name)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(here, path)) if path else name
        if not os.path.exists(os.path.join(ROOT, path)):
            bad.append(f"{target}: no file {path}")
        elif anchor and path.endswith(".md") and anchor not in anchors(read(path)):
            bad.append(f"{target}: no heading #{anchor} in {path}")
    assert not bad, f"{name}: " + "; ".join(bad)


def test_no_pointers_to_files_outside_the_repository():
    bad = [name for name in DOCS if "shared/README" in read(name)]
    assert not bad, f"{bad} point to shared/README.md, which users do not have: say it in docs/reference.md"


def commands(text: str) -> list[str]:
    """Shell commands, one per line: comments, `-q` and `||` alternatives taken apart."""
    out = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
        if line and not line.startswith("#"):
            out += [re.sub(r" -q\b", "", part).strip() for part in line.split(" || ")]
    return out


def test_ci_runs_the_readme_install_and_test_lines():
    section = read("README.md").split("## Install and test", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    ci = commands(read(os.path.join(".ci", "run")))
    # (the fast tier is a part of the suite CI runs whole)
    missing = [c for c in commands(block) if c not in ci and '-m "not slow"' not in c]
    assert not missing, f".ci/run does not run the README's {missing}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("readme") / "models")


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tiny, monkeypatch, tmp_path):
    from animatediff_jax.checkpoints.sd15 import load_sd15

    code = python_blocks()[index]
    paths = {
        "models/sd15": tiny["base_model"],
        "path/to/mm_sd_v15_v2.ckpt": tiny["motion_module"],
        "models/zoom_in.safetensors": tiny["motion_lora_zoom_in"],
        "configs/sample/v2_motion_lora_zoom_in.py":
            os.path.join(ROOT, "configs", "sample", "tiny.py") + ":" + os.path.dirname(tiny["base_model"]),
    }
    for placeholder, path in paths.items():
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    code = re.sub(r"num_frames=16", "num_frames=4", code)
    code = re.sub(r"height=512, width=512", "height=32, width=32", code)
    sd = load_sd15(tiny["base_model"])
    rng = np.random.default_rng(0)
    given = {  # what the examples take as given
        "latents": rng.standard_normal((1, 4, 8, 8, sd.unet_config.in_channels), np.float32),
        "timesteps": np.array([500]),
        "text_embeddings": rng.standard_normal((1, 77, sd.unet_config.cross_attention_dim), np.float32),
    }
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    exec(compile(code, f"README.md python block {index}", "exec"), dict(given))


def test_sampling_doc_names_every_sample_config_field():
    from animatediff_jax.sampling.config import base_config

    def fields(c, prefix=""):
        for k, v in c.items():
            if hasattr(v, "items") and k in ("context_windows", "evaluate", "output"):
                yield from fields(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    doc = read(os.path.join("docs", "sampling.md"))
    table = doc.split("### Every field", 1)[1]
    missing = [f for f in fields(base_config()) if f"`{f}`" not in table and f"`.{f.rsplit('.', 1)[-1]}`" not in table]
    assert not missing, f"docs/sampling.md's field table lacks {missing}"

"""Textual-inversion embeddings: every file layout users have (written here in the released layouts),
prompt embeddings against diffusers' `load_textual_inversion` + `encode_prompt` on the same files
(fp32, 1e-5 of the reference's scale: `conftest.assert_close`'s default), the pipeline as a value, and
the one-line errors (a token already taken, another width, files that are not embeddings).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file

from animatediff_jax.checkpoints.embeddings import load_embeddings, read_embedding
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.errors import ConfigError
from animatediff_jax.sampling.prompts import encode_text

D = 32  # the tiny text encoder's width


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from torch_refs import tiny_text_encoder

    return tiny_text_encoder(str(tmp_path_factory.mktemp("tok")))


def a1111_pt(path, vectors, name="trained-name"):
    """The web UI's `.pt` (textual_inversion.py `Embedding.save`)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 1500,
                "sd_checkpoint": "81761151", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each layout: {what: (entry, token, vectors)}."""
    root = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    vec = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    out = {}
    v = vec(2, D)
    a1111_pt(root / "easyneg.pt", v)
    out["a1111_pt"] = (str(root / "easyneg.pt"), "easyneg", v)
    v = vec(3, D)
    save_file({"emb_params": v}, str(root / "badhand.safetensors"))
    out["a1111_safetensors"] = (str(root / "badhand.safetensors"), "badhand", v)
    os.makedirs(root / "cat-toy")
    v = vec(D)
    torch.save({"<cat-toy>": v}, root / "cat-toy" / "learned_embeds.bin")  # diffusers' training script
    out["diffusers_bin"] = (str(root / "cat-toy"), "<cat-toy>", v[None])
    os.makedirs(root / "dog-toy")
    v = vec(2, D)
    save_file({"<dog-toy>": v}, str(root / "dog-toy" / "learned_embeds.safetensors"))
    out["diffusers_safetensors"] = (str(root / "dog-toy" / "learned_embeds.safetensors"), "<dog-toy>", v)
    return out


def test_each_layout_reads_its_token_and_vectors(files):
    for what, (entry, token, vectors) in files.items():
        (e,) = load_embeddings([entry])
        assert e.token == token, what
        np.testing.assert_array_equal(e.vectors, vectors.numpy().reshape(-1, D), err_msg=what)
    assert read_embedding(files["a1111_pt"][0], "other").token == "other"  # a given token wins
    folder = os.path.dirname(files["a1111_pt"][0])  # a folder: its files, then its subfolders', each sorted
    assert [e.token for e in load_embeddings([folder])] == ["badhand", "easyneg", "<cat-toy>", "<dog-toy>"]


class DiffusersTextOnly:
    """The parts of a diffusers pipeline `load_textual_inversion` and `encode_prompt` use."""

    hf_device_map = None

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.unet = tokenizer, text_encoder, None

    @property
    def components(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}


PROMPTS = ["a easyneg cat, badhand", "<cat-toy> on the dog"]
NEGATIVES = ["<dog-toy> the dog", ""]


def test_prompt_embeddings_match_diffusers_load_textual_inversion(text, files):
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    model, tok, pipe = text
    ref = type("Ref", (DiffusersTextOnly, TextualInversionLoaderMixin), {})(copy.deepcopy(tok), copy.deepcopy(model))
    entries = [entry for entry, _, _ in files.values()]
    tokens = ["easyneg", "badhand", None, None]  # the web UI's files: their names (diffusers would take the stored)
    ref.load_textual_inversion(entries, token=tokens, local_files_only=True)
    with torch.no_grad():
        want, want_neg = StableDiffusionPipeline.encode_prompt(ref, PROMPTS, "cpu", 1, True, negative_prompt=NEGATIVES)

    ours = pipe.with_embeddings(load_embeddings(entries))
    assert len(ours.tokenizer) == len(ref.tokenizer) == len(tok) + 8  # 2 + 3 + 1 + 2 vectors
    for syntax in ("plain", "a1111"):
        cond, uncond, _ = encode_text(ours, PROMPTS, NEGATIVES, syntax=syntax)
        err = assert_close(cond, want.numpy(), what=f"prompts, {syntax}")
        assert_close(uncond, want_neg.numpy(), what=f"negatives, {syntax}")
        print(f"{syntax}: max abs err {err:.2e} vs diffusers")
    # The embeddings do something: without them the trigger words are plain text.
    assert np.abs(np.asarray(encode_text(pipe, PROMPTS, None)[0]) - np.asarray(cond)).max() > 1e-2
    # A value: the pipeline they were added to is unchanged.
    assert len(pipe.tokenizer) == len(tok) and pipe.text_config.vocab_size == 1000 and not pipe.tokenizer.vectors
    table = lambda p: p.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]  # noqa: E731
    assert table(pipe).shape == (1000, D) and table(ours).shape == (1000, D)  # (the tiny table has room)


def test_weights_and_chunks_keep_an_embedding_whole(text, files):
    _, tok, pipe = text
    ours = pipe.with_embeddings(load_embeddings([files["a1111_safetensors"][0]]))
    ids, w = ours.tokenizer.chunks("a (badhand:1.3) cat")
    first = ours.tokenizer.vocab()["badhand"]
    assert list(ids[0, 1:6]) == [tok.convert_tokens_to_ids("a</w>"), first, first + 1, first + 2,
                                 tok.convert_tokens_to_ids("cat</w>")]
    assert list(w[0, 1:6]) == pytest.approx([1.0, 1.3, 1.3, 1.3, 1.0])
    ids, _ = ours.tokenizer.chunks(" ".join(["a"] * 74) + " badhand")  # 3 vectors do not fit after 74 tokens
    assert ids.shape == (2, 77) and list(ids[1, 1:4]) == [first, first + 1, first + 2]
    assert ids[0, 75] == tok.eos_token_id


def test_bad_files_are_one_line_naming_the_file(text, files, tmp_path):
    _, _, pipe = text

    def refused(entries, match):
        with pytest.raises(CheckpointError, match=match) as e:
            pipe.with_embeddings(load_embeddings(entries))
        assert "\n" not in str(e.value)
        return str(e.value)

    a1111_pt(tmp_path / "ca.pt", torch.zeros(1, D))  # "ca" is a token of the tiny vocabulary
    assert refused([str(tmp_path / "ca.pt")], "token 'ca' is already the tokenizer's").startswith(str(tmp_path))
    os.makedirs(tmp_path / "again")
    save_file({"emb_params": torch.zeros(1, D)}, str(tmp_path / "again" / "easyneg.safetensors"))
    refused([files["a1111_pt"][0], str(tmp_path / "again")], r"again/easyneg.safetensors: token 'easyneg' is already")
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "wide.safetensors"))
    refused([str(tmp_path / "wide.safetensors")], r"wide.safetensors: vectors 768 wide; this text encoder's tokens "
                                                   r"are 32 wide")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    refused([str(tmp_path / "xl.safetensors")], r"xl.safetensors: an SDXL embedding")
    torch.save({"a": torch.zeros(D), "b": torch.zeros(D)}, tmp_path / "two.bin")
    refused([str(tmp_path / "two.bin")], r"two.bin: not a textual-inversion embedding")
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, D))})},
               tmp_path / "module.pt")  # an object, not tensors: never unpickled
    refused([str(tmp_path / "module.pt")], r"module.pt: refused: unsafe")
    os.makedirs(tmp_path / "empty")
    refused([str(tmp_path / "empty")], r"empty: no embedding files in this folder")
    refused([{"path": os.path.dirname(files["a1111_pt"][0]), "token": "x"}], r"a token \('x'\) is for one embedding "
            r"file; this folder has 4")


def test_sample_config_loads_them(files, tmp_path_factory):
    from animatediff_jax.sampling import load_pipeline
    from animatediff_jax.sampling.assemble import validate
    from animatediff_jax.sampling.config import base_config
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))
    c = base_config()
    c.base_model, c.motion_module, c.prompt = paths["base_model"], paths["motion_module"], ("a easyneg cat",)
    c.dtype = "bfloat16"
    for bad, msg in (((files["a1111_pt"][0], "/nope/x.pt"), "embeddings[1]: /nope/x.pt: no such file or folder"),
                     ((3,), "embeddings[0]=3: expected a file or folder, or {'path': ..., 'token': ...}"),
                     (({"path": files["a1111_pt"][0], "tokn": "x"},), "embeddings[0]={'path'")):
        c.embeddings = bad
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("{", r"\{")):
            validate(c)
    c.embeddings = (files["diffusers_bin"][0], {"path": files["a1111_pt"][0], "token": "neg"})
    pipe = load_pipeline(validate(c))
    vocab = pipe.tokenizer.vocab()
    assert {"<cat-toy>", "neg", "neg_1"} <= set(vocab) and "easyneg" not in vocab
    emb = pipe.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert emb.dtype == np.dtype("bfloat16")  # (cast as the rest of the text encoder)
    want = files["a1111_pt"][2].numpy()
    np.testing.assert_array_equal(np.asarray(emb[vocab["neg"]:vocab["neg"] + 2], np.float32),
                                  want.astype("bfloat16").astype(np.float32))
    c.embeddings = (files["a1111_pt"][0], files["a1111_pt"][0])
    with pytest.raises(ConfigError, match=r"^embeddings: .*easyneg.pt: token 'easyneg' is already"):
        load_pipeline(validate(c))

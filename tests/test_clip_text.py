"""CLIP text encoder and tokenizer parity against transformers (and diffusers' encode_prompt)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.checkpoints.sd15 import convert_clip_text
from animatediff_jax.checkpoints.torch_io import CheckpointError
from animatediff_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from animatediff_jax.testing.tiny import write_tiny_tokenizer
from animatediff_jax.text import Tokenizer, encode_prompts

TINY = CLIPTextConfig.tiny()
BOS, EOS = TINY.vocab_size - 2, TINY.vocab_size - 1  # CLIP's real ids are the last two of the vocab too
BOS_L, EOS_L = 49406, 49407  # SD1.5's <|startoftext|>, <|endoftext|>


def torch_clip(cfg: CLIPTextConfig):
    """transformers' CLIPTextModel with every parameter random (layer norms too), eval, fp32."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    hf_cfg = HFConfig(**cfg.transformers_kwargs(), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    model = HFModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def flax_target(cfg: CLIPTextConfig, length: int = 77):
    model = CLIPTextModel(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]
    return model, shapes


def padded_ids(rng: np.random.Generator, lengths: list[int], total: int = 77) -> np.ndarray:
    """`[BOS, words..., EOS, EOS (pad)...]` rows as the SD1.5 tokenizer produces them."""
    ids = np.full((len(lengths), total), EOS, np.int64)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = rng.integers(0, BOS, n)
    return ids


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = torch_clip(TINY)
    model, target = flax_target(TINY)
    sd = state_dict_np(ref)
    # transformers 5 keeps neither the `text_model.` prefix nor the position_ids buffer in
    # memory; SD1.5 files have both. Convert the file layout, as load_component returns it.
    file_sd = {"text_model." + k: v for k, v in sd.items()}
    file_sd["text_model.embeddings.position_ids"] = np.arange(TINY.max_positions)[None]
    params = convert_clip_text(file_sd, target)
    return ref, model, params, sd


def test_tiny_last_hidden_state_matches_transformers(tiny_pair):
    ref, model, params, _ = tiny_pair
    ids = padded_ids(np.random.default_rng(0), [5, 75, 0])
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    err = assert_close(got, want, what="last_hidden_state")
    print(f"tiny last_hidden_state max abs err {err:.2e}")
    # A shorter sequence uses the first positions only, as transformers does.
    with torch.no_grad():
        want_short = ref(torch.from_numpy(ids[:, :9])).last_hidden_state.numpy()
    assert_close(model.apply({"params": params}, jnp.asarray(ids[:, :9])), want_short, what="9 tokens")


@pytest.mark.parametrize("clip_skip", [1, 2, TINY.num_layers])
def test_tiny_clip_skip_matches_hidden_states_path(tiny_pair, clip_skip):
    ref, model, params, _ = tiny_pair
    ids = padded_ids(np.random.default_rng(1), [12, 3])
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        assert len(out.hidden_states) == TINY.num_layers + 1  # embeddings + every layer
        want = ref.final_layer_norm(out.hidden_states[-(clip_skip + 1)]).numpy()
    got = model.apply({"params": params}, jnp.asarray(ids), clip_skip)
    err = assert_close(got, want, what=f"clip_skip={clip_skip}")
    print(f"tiny clip_skip={clip_skip} max abs err {err:.2e}")


def test_clip_skip_zero_and_none_are_the_last_layer(tiny_pair):
    _, model, params, _ = tiny_pair
    ids = jnp.asarray(padded_ids(np.random.default_rng(2), [4]))
    base = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(model.apply({"params": params}, ids, 0), base)
    np.testing.assert_array_equal(model.apply({"params": params}, ids, None), base)
    assert not np.allclose(model.apply({"params": params}, ids, 1), base)
    for bad in (-1, TINY.num_layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            model.apply({"params": params}, ids, bad)
    with pytest.raises(ValueError, match="positions"):
        model.apply({"params": params}, jnp.zeros((1, TINY.max_positions + 1), jnp.int32))


def test_bf16_compute_stays_close(tiny_pair):
    ref, _, params, _ = tiny_pair
    ids = padded_ids(np.random.default_rng(3), [6, 20])
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = CLIPTextModel(TINY, dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids))
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, rtol=5e-2, atol=0, what="bf16 compute")


def test_in_memory_transformers5_state_dict_converts(tiny_pair):
    """transformers 5's `CLIPTextModel.state_dict()` (no prefix) gives the same params."""
    _, _, params, sd = tiny_pair
    _, target = flax_target(TINY)
    again = convert_clip_text(sd, target)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_wrong_checkpoints_name_the_key(tiny_pair):
    _, _, _, sd = tiny_pair
    _, target = flax_target(TINY)
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    # In the state dict's own words (it has no `text_model.` prefix), with the PyTorch shape.
    with pytest.raises(CheckpointError, match=rf"missing keys: encoder\.layers\.1\.mlp\.fc2\.bias \({TINY.hidden_size},\)"):
        convert_clip_text(missing, target)
    reshaped = dict(sd, **{"encoder.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r": encoder\.layers\.0\.self_attn\.q_proj\.weight: the file has \(3, 3\)"):
        convert_clip_text(reshaped, target)
    extra = dict(sd, **{"text_projection.weight": np.zeros((4, TINY.hidden_size), np.float32)})
    with pytest.raises(CheckpointError, match=r"text_projection\.weight"):
        convert_clip_text(extra, target)


def test_sd15_forward_matches_transformers():
    """Real-size architecture (random weights), short sequence: names, shapes, numerics."""
    cfg = CLIPTextConfig.sd15()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) == (
        49408, 768, 3072, 12, 12
    )
    torch.manual_seed(0)
    ref = torch_clip(cfg)
    model, target = flax_target(cfg, length=8)
    sd = {"text_model." + k: v for k, v in state_dict_np(ref).items()}
    params = convert_clip_text(sd, target)  # strict: exactly the transformers key set
    ids = np.array([[BOS_L, 320, 1929, 539, 320, 2368, EOS_L, EOS_L]], np.int64)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        want = out.last_hidden_state.numpy()
        want_skip = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    apply = jax.jit(model.apply, static_argnums=2)
    err = assert_close(apply({"params": params}, jnp.asarray(ids), 0), want, rtol=2e-5, what="sd15")
    err_skip = assert_close(apply({"params": params}, jnp.asarray(ids), 1), want_skip, rtol=2e-5, what="sd15 skip")
    print(f"sd15 max abs err {err:.2e}, clip_skip=1 {err_skip:.2e}")


# ------------------------------------------------------------------------ tokenizer


PROMPTS = ["the cat", "A dog, and THE cat!", "", "cat " * 100, "x9 y"]


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import CLIPTokenizer

    vocab = write_tiny_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    ids = tok(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    hf = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, want)
    # Spelled out: BOS, lower-cased merged words, EOS, then EOS padding; truncation keeps EOS last.
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    words = [vocab[w] for w in ("a</w>", "dog</w>", ",</w>", "and</w>", "the</w>", "cat</w>", "!</w>")]
    np.testing.assert_array_equal(ids[1, :9], [bos, *words, eos])
    assert (ids[1, 9:] == eos).all()
    np.testing.assert_array_equal(ids[2, :2], [bos, eos])
    assert ids[3, 0] == bos and ids[3, -1] == eos and (ids[3, 1:-1] == vocab["cat</w>"]).all()
    np.testing.assert_array_equal(tok("the cat"), ids[:1])
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "nope")


class _DiffusersTextEncoder:
    """transformers 5's CLIPTextModel lacks the `.text_model` that diffusers' clip_skip path
    reads `final_layer_norm` from; this shim restores it and forwards everything else."""

    def __init__(self, model):
        self.model, self.text_model = model, model
        self.config, self.dtype = model.config, model.dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_encode_prompts_matches_diffusers_encode_prompt(tmp_path, tiny_pair, clip_skip):
    """End to end against `StableDiffusionPipeline.encode_prompt` (tokenizer + encoder + clip_skip)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    ref, model, params, _ = tiny_pair
    vocab = write_tiny_tokenizer(tmp_path)
    assert max(vocab.values()) < TINY.vocab_size
    hf_tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True, model_max_length=77)
    pipe = types.SimpleNamespace(tokenizer=hf_tok, text_encoder=_DiffusersTextEncoder(ref), unet=None)
    prompts, negative = ["a dog, and the cat!", "x9 y"], ["", "the dog"]
    with torch.no_grad():
        pos, neg = StableDiffusionPipeline.encode_prompt(
            pipe, prompts, "cpu", 1, True, negative_prompt=negative, clip_skip=clip_skip
        )
    tok = Tokenizer(tmp_path)
    got = encode_prompts(model, params, tok, prompts, clip_skip=clip_skip)
    err = assert_close(got, pos.numpy(), what=f"encode_prompts clip_skip={clip_skip}")
    # diffusers encodes negative prompts WITHOUT clip_skip (always the last layer).
    assert_close(encode_prompts(model, params, tok, negative), neg.numpy(), what="negative")
    print(f"encode_prompts vs diffusers clip_skip={clip_skip} max abs err {err:.2e}")

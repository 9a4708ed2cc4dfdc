"""Weighted and long prompts (AUTOMATIC1111's syntax): the parser against the web UI's documented
answers, the chunks, the embeddings against transformers' `CLIPTextModel` by the rule written out
below, the one-line errors, and a tiny sampling run where a weighted word moves the video more.

The rule (`modules/sd_hijack_clip.py` + `sd_emphasis.py`, "Original" emphasis): the prompt is split
into (text, weight) fragments, each fragment tokenised on its own; the tokens fill chunks of 75 (a
BREAK closes one), each chunk `[BOS, tokens, EOS, pad...]` (77) is encoded alone; `z` of a chunk is
multiplied token by token by its weights, then by `mean(z) / mean(z * w)`; the chunks are joined along
the sequence, and every text of a call has as many chunks as the longest (empty chunks, `""`, added).
Tolerance: fp32, 1e-5 of the reference's scale (`conftest.assert_close`'s default).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import assert_close

from animatediff_jax.errors import ConfigError, FieldError
from animatediff_jax.prompt_syntax import BREAK, PromptSyntaxError, parse
from animatediff_jax.sampling import Request
from animatediff_jax.sampling.prompts import encode_prompts, encode_text

# ----------------------------------------------------------------------------------- the parser

A1111_DOCUMENTED = [  # modules/prompt_parser.py::parse_prompt_attention's docstring, verbatim
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
MORE = [  # worked out by the same rules (the web UI's parser gives these too)
    ("((a))", [["a", 1.1 * 1.1]]),
    ("[[a]] b", [["a", 1 / 1.1 / 1.1], [" b", 1.0]]),
    ("(a:1.3) (b [c]:0.5)", [["a", 1.3], [" ", 1.0], ["b ", 0.5], ["c", 1 / 1.1 * 0.5]]),
    ("\\(a\\) \\\\ b\\c", [["(a) \\ bc", 1.0]]),  # escapes; a lone backslash is dropped
    ("a: (b: c)", [["a: ", 1.0], ["b: c", 1.1]]),  # a colon without a number is text
    ("a BREAK b", [["a", 1.0], list(BREAK), ["b", 1.0]]),
    ("a, BREAK BREAK (b)", [["a,", 1.0], list(BREAK), ["", 1.0], list(BREAK), ["", 1.0], ["b", 1.1]]),
    ("", [["", 1.0]]),
]


@pytest.mark.parametrize("text,want", A1111_DOCUMENTED + MORE)
def test_parse_gives_the_web_uis_answers(text, want):
    assert [list(f) for f in parse(text, strict=False)] == want  # exactly: the same floats, same order
    if text != "(unbalanced" and "house" not in text:
        assert parse(text, strict=True) == parse(text, strict=False)


@pytest.mark.parametrize("text,msg", [
    ("(unbalanced", "unbalanced '(' at character 1"),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "unbalanced '(' at character 3"),
    ("a cat)", "unbalanced ')' at character 6"),
    ("[a", "unbalanced '[' at character 1"),
    ("a] b", "unbalanced ']' at character 2"),
    ("(a:1.2.3)", "weight '1.2.3' at character 4"),
    ("()", "has no text"),
    ("(:1.2) BREAK", "has no text"),
])
def test_strict_parse_refuses_in_one_line(text, msg):
    with pytest.raises(PromptSyntaxError, match=re.escape(msg)) as e:
        parse(text, strict=True)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from torch_refs import tiny_text_encoder

    return tiny_text_encoder(str(tmp_path_factory.mktemp("tok")))


def ref_chunks(tok, fragments):
    """The rule's chunks of `fragments` ((text, weight) or BREAK): `[(ids[77], weights[77]), ...]`."""
    chunks, ids, ws = [], [], []

    def close():
        chunks.append(([tok.bos_token_id] + ids + [tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids)),
                       [1.0] + ws + [1.0] * (76 - len(ws))))

    for frag in fragments:
        if frag == BREAK:
            close()
            ids, ws = [], []
            continue
        for i in tok(frag[0], add_special_tokens=False).input_ids if frag[0] else []:
            if len(ids) == 75:
                close()
                ids, ws = [], []
            ids.append(i)
            ws.append(frag[1])
    if ids or not chunks:
        close()
    return chunks


def ref_embed(model, tok, fragments, clip_skip=0, k=None):
    """The rule's `[K * 77, D]` embedding of `fragments`, padded with empty chunks to `k`."""
    chunks = ref_chunks(tok, fragments)
    zs = []
    for ids, w in chunks + ref_chunks(tok, [("", 1.0)]) * ((k or len(chunks)) - len(chunks)):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
            z = out.last_hidden_state if not clip_skip else model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        z = z[0]
        mean = z.mean()
        z = z * torch.tensor(w)[:, None]
        zs.append(z * (mean / z.mean()))
    return torch.cat(zs).numpy()


WEIGHTED = "a (cat:1.5) and [the dog], ((4k))"
WEIGHTED_FRAGMENTS = [("a ", 1.0), ("cat", 1.5), (" and ", 1.0), ("the dog", 1 / 1.1), (", ", 1.0), ("4k", 1.1 * 1.1)]
WORDS = "cat dog the and a x y z".split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(200))  # 200 tokens in the tiny vocabulary, no commas


# ----------------------------------------------------------------------------------- chunks


def test_chunks_cut_at_75_at_a_late_comma_and_at_break(text):
    _, tok, pipe = text
    t = pipe.tokenizer
    ids, w = t.chunks(LONG)
    assert ids.shape == w.shape == (3, 77) and (w == 1).all()
    body = [i for row in ids for i in row[1:][: list(row[1:]).index(tok.eos_token_id)]]
    assert body == tok(LONG, add_special_tokens=False).input_ids  # every token, in order: none cut
    comma = tok.get_vocab()[",</w>"]
    near = " ".join(["a"] * 70) + ", " + " ".join(["b"] * 10)  # a comma 5 tokens before the chunk's end
    ids, _ = t.chunks(near)
    assert list(ids[0, 70:73]) == [tok.convert_tokens_to_ids("a</w>"), comma, tok.eos_token_id]  # ends after it
    assert (ids[1, 1:11] == tok.convert_tokens_to_ids("b</w>")).all()  # the 10 b's moved on
    far = " ".join(["a"] * 50) + ", " + " ".join(["b"] * 30)  # a comma 25 tokens back: a full chunk
    ids, _ = t.chunks(far)
    assert (ids[0] != tok.eos_token_id).sum() == 76 and (ids[1] != tok.eos_token_id).sum() == 7
    ids, w = t.chunks("a cat BREAK (the dog)")
    the_dog = tok("the dog", add_special_tokens=False).input_ids
    assert ids.shape == (2, 77) and list(ids[1, :3]) == [tok.bos_token_id] + the_dog
    assert list(w[1, :4]) == pytest.approx([1.0, 1.1, 1.1, 1.0])


# ----------------------------------------------------------------------------------- embeddings


def test_plain_prompt_gives_todays_embeddings_exactly(text):
    model, tok, pipe = text
    prompts, negs = ["a cat and the dog", "x9 y, the cat"], ["", "the dog"]
    a1111 = encode_text(pipe, prompts, negs, 1)
    plain = encode_text(pipe, prompts, negs, 1, syntax="plain")
    for got, want in zip(a1111[:2], plain[:2]):
        assert got.shape == (2, 77, 32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = ref_embed(model, tok, [(prompts[0], 1.0)], clip_skip=1)
    assert_close(a1111[0][0], ref, what="plain prompt vs transformers")


def test_weighted_long_prompts_match_the_rule(text):
    model, tok, pipe = text
    long_weighted = f"(cat dog:1.2) {LONG} BREAK [the] end"
    long_fragments = [("cat dog", 1.2), (f" {LONG}", 1.0), BREAK, ("the", 1 / 1.1), (" end", 1.0)]
    for clip_skip in (0, 2):
        cond, uncond, _ = encode_text(pipe, [WEIGHTED, long_weighted], ["(worst:1.4) quality", ""], clip_skip)
        assert cond.shape == uncond.shape == (2, 4 * 77, 32)  # 202 tokens + BREAK: 4 chunks; all texts alike
        for b, fragments in enumerate([WEIGHTED_FRAGMENTS, long_fragments]):
            want = ref_embed(model, tok, fragments, clip_skip, k=4)
            err = assert_close(cond[b], want, what=f"prompt {b} clip_skip={clip_skip}")
            print(f"weighted prompt {b}, clip_skip={clip_skip}: max abs err {err:.2e}")
        # negatives: the last layer whatever clip_skip is (diffusers'), padded with empty chunks too
        assert_close(uncond[0], ref_embed(model, tok, [("worst", 1.4), (" quality", 1.0)], 0, k=4),
                     what="weighted negative")
        assert_close(uncond[1], ref_embed(model, tok, [("", 1.0)], 0, k=4), what="empty negative")


def test_the_tail_of_a_long_prompt_counts(text):
    _, _, pipe = text
    other = LONG.rsplit(" ", 1)[0] + " x"  # the 200th token changed
    a = np.asarray(encode_text(pipe, [LONG, other], None)[0])
    assert a.shape == (2, 3 * 77, 32)
    np.testing.assert_array_equal(a[0, :154], a[1, :154])  # the first two chunks: the same tokens
    assert np.abs(a[0, 154:] - a[1, 154:]).max() > 1e-3  # the last one sees the change
    p = np.asarray(encode_text(pipe, [LONG, other], None, syntax="plain")[0])
    assert p.shape == (2, 77, 32)
    np.testing.assert_array_equal(p[0], p[1])  # diffusers' reading cuts the tail off


def test_travel_pads_every_text_to_the_same_chunks(text):
    model, tok, pipe = text
    travel = {0: "a (cat:1.3)", 2: LONG}
    cond, uncond, _ = encode_prompts(pipe, [travel], [""], num_frames=4)
    assert cond.shape == (1, 4, 3 * 77, 32) and uncond.shape == (1, 4, 3 * 77, 32)
    first = ref_embed(model, tok, [("a ", 1.0), ("cat", 1.3)], k=3)
    last = ref_embed(model, tok, [(LONG, 1.0)], k=3)
    assert_close(cond[0, 0], first, what="keyframe 0")
    assert_close(cond[0, 1], (first + last) / 2, what="frame 1 (halfway)")
    assert_close(cond[0, 2], last, what="keyframe 2")
    assert_close(cond[0, 3], last, what="held to the end")


# ----------------------------------------------------------------------------------- errors


def test_bad_prompts_are_one_line_naming_the_prompt():
    with pytest.raises(FieldError, match=r"^prompts\[1\]='a \(cat': unbalanced '\(' at character 3") as e:
        Request(("a dog", "a (cat"), None, (0, 1))
    assert "\n" not in str(e.value) and "prompt_syntax='plain'" in str(e.value)
    with pytest.raises(FieldError, match=r"^negative_prompts\[0\]='\(\)': has no text"):
        Request(("a dog",), ("()",), (0,))
    with pytest.raises(FieldError, match="prompt_syntax='a1112': expected one of a1111, plain"):
        Request(("a dog",), None, (0,), prompt_syntax="a1112")
    Request(("a (cat",), None, (0,), prompt_syntax="plain")  # brackets are text there


def test_config_errors_name_the_config_field():
    from animatediff_jax.sampling.assemble import validate
    from animatediff_jax.sampling.config import base_config

    c = base_config()
    c.prompt = ("a dog", "(a cat:1.2")
    with pytest.raises(ConfigError, match=r"^prompt\[1\]='\(a cat:1.2': unbalanced '\('"):
        validate(c, files=False)
    c.prompt, c.n_prompt = ("a dog",), ("bad]",)
    with pytest.raises(ConfigError, match=r"^n_prompt\[0\]='bad\]': unbalanced '\]'"):
        validate(c, files=False)
    c.prompt, c.n_prompt, c.prompt_map = (), ("",), {"0": "a dog", "2": "a ((cat)"}
    with pytest.raises(ConfigError, match=r"^prompt_map='a \(\(cat\)': unbalanced"):
        validate(c, files=False)
    c.prompt_syntax = "plain"
    assert validate(c, files=False)["prompt_syntax"] == "plain"


# ----------------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from animatediff_jax.sampling import load_pipeline
    from animatediff_jax.sampling.assemble import validate
    from animatediff_jax.sampling.config import base_config
    from animatediff_jax.testing.tiny import write_tiny_models

    paths = write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))
    c = base_config()
    c.base_model, c.motion_module, c.prompt, c.dtype = paths["base_model"], paths["motion_module"], ("a",), "float32"
    return load_pipeline(validate(c))


def test_a_weighted_word_moves_the_video_more(tiny_pipe):
    from animatediff_jax.sampling import generate

    prompts = ["a cat, the sky", "a dog, the sky", "a (cat:2), the sky", "a (dog:2), the sky"]
    out = generate(tiny_pipe, prompts, None, [7] * 4, num_frames=4, height=16, width=16, steps=2, progress=False)
    lat = out.latents.astype(np.float64)
    plain, weighted = np.abs(lat[0] - lat[1]).mean(), np.abs(lat[2] - lat[3]).mean()
    print(f"cat -> dog moves the latents by {plain:.4f}; (cat:2) -> (dog:2) by {weighted:.4f}")
    assert weighted > 1.2 * plain > 0  # measured: 2.43 vs 1.83 (seed 7)

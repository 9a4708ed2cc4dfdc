"""AUTOMATIC1111's prompt syntax: attention weights and `BREAK` (a leaf: pure text, no models).

    a (word) b        word x 1.1          ((word)) x 1.21, each pair multiplies
    a [word] b        word / 1.1
    a (word:1.3) b    word x 1.3          (several words, nested (brackets):0.8) too
    \\( \\) \\[ \\]   the bracket itself  \\\\ a backslash
    a BREAK b         b starts a new 75-token chunk

The reference is the web UI's `modules/prompt_parser.py::parse_prompt_attention`: `parse(text,
strict=False)` gives its answers exactly (the same fragments, the same float products, in the same
order), lenient as it is (an unclosed bracket weights everything after it, a stray closing bracket is
text). The sampler reads prompts with `strict=True`, where an unbalanced bracket, a weight that is not a
number, or a prompt that is nothing but brackets is a `PromptSyntaxError` (a one-line message saying
where). One difference in both modes: `BREAK` inside brackets still breaks (the web UI multiplies its
marker by the weight and then reads it as the word "BREAK").

`text.Tokenizer.chunks` turns the fragments into token chunks with per-token weights.
"""

from __future__ import annotations

import re

SYNTAXES = ("a1111", "plain")  # how the sampler reads a prompt: this syntax (weights, chunks), or diffusers' text as is
ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]
BREAK = ("BREAK", -1.0)  # the marker of a chunk break in `parse`'s list (as the web UI writes it)

Fragment = tuple[str, float]

# One match per piece of syntax, in the web UI's order: escapes, a lone backslash (dropped), the brackets,
# ":weight)" closing a round bracket, text without syntax characters, and a colon that closes nothing.
_PIECES = re.compile(r"""
    \\[()\[\]\\]
  | \\
  | [(\[]
  | :([+-]?[.\d]+)\)
  | [)\]]
  | [^\\()\[\]:]+
  | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptSyntaxError(ValueError):
    """A prompt the strict parser refuses: the message says what and where (one line)."""


def _where(text: str, pos: int) -> str:
    """`at character 7 ("...cat (dog...")`: a position and a little of the text around it."""
    lo, hi = max(0, pos - 12), min(len(text), pos + 12)
    snippet = ("..." if lo else "") + text[lo:hi] + ("..." if hi < len(text) else "")
    return f"at character {pos + 1} ({snippet!r})"


def parse(text: str, strict: bool = True) -> list[Fragment]:
    """`text` as `[(text, weight), ...]` fragments in order, runs of one weight merged, `BREAK` where
    a chunk break is asked for; `[("", 1.0)]` for an empty prompt. See the module docstring."""
    out: list[list] = []  # [text, weight] items, or None for a BREAK (never weighted)
    opened: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # (first item inside, text position)

    def weigh(start: int, factor: float) -> None:
        for item in out[start:]:
            if item is not None:
                item[1] *= factor

    def add_text(piece: str) -> None:
        for i, part in enumerate(_BREAK.split(piece)):
            if i:
                out.append(None)
            out.append([part, 1.0])

    for m in _PIECES.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece in ("(", "["):
            opened[piece].append((len(out), m.start()))
        elif weight is not None or piece == ")":
            if not opened["("]:
                if strict:
                    raise PromptSyntaxError(f"unbalanced ')' {_where(text, m.end() - 1)}: no '(' before it (write "
                                            "\\) for a literal bracket)")
                add_text(piece)
                continue
            start = opened["("].pop()[0]
            if weight is None:
                weigh(start, ROUND)
                continue
            try:
                factor = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"weight {weight!r} {_where(text, m.start() + 1)} is not a number") from None
            weigh(start, factor)
        elif piece == "]":
            if not opened["["]:
                if strict:
                    raise PromptSyntaxError(f"unbalanced ']' {_where(text, m.start())}: no '[' before it (write "
                                            "\\] for a literal bracket)")
                add_text(piece)
                continue
            weigh(opened["["].pop()[0], SQUARE)
        else:
            add_text(piece)
    for bracket, factor in (("(", ROUND), ("[", SQUARE)):
        if opened[bracket] and strict:
            raise PromptSyntaxError(f"unbalanced {bracket!r} {_where(text, opened[bracket][0][1])}: it is never "
                                    f"closed (write \\{bracket} for a literal bracket)")
        for start, _ in opened[bracket]:
            weigh(start, factor)

    merged: list[Fragment] = []
    for item in out or [["", 1.0]]:
        if item is None:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == item[1]:
            merged[-1] = (merged[-1][0] + item[0], item[1])
        else:
            merged.append((item[0], item[1]))
    if strict and text.strip() and not "".join(t for t, _ in _words(merged)).strip():
        raise PromptSyntaxError("has no text once its brackets, weights and BREAKs are read")
    return merged


def _words(fragments: list[Fragment]) -> list[Fragment]:
    return [f for f in fragments if f is not BREAK]


def is_break(fragment: Fragment) -> bool:
    """Whether a fragment of `parse`'s list is the chunk break."""
    return fragment is BREAK

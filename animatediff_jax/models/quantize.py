"""int8 for the frozen spatial UNet (qwix post-training quantization).

Modes (`UNET_QUANTIZE`):
- `none`: as loaded (the default: exact to PyTorch);
- `int8_weights`: the spatial linear layers' kernels stored as int8 with a float scale per output channel
  and dequantized inside the matmul (half their bytes of bf16; the products still run in the compute dtype;
  convs stay as loaded: qwix quantizes a conv's weights only together with its input);
- `int8`: the linear layers' and the convs' kernels int8, and each one's input quantized per row on the
  fly, so the product runs int8 x int8 -> int32 (v5e's MXU does int8 at twice its bf16 rate).

What stays in the compute dtype: the motion modules (they are what a video model adds, and what LoRAs and
training change), the attention products themselves (`einsum`s, not weights), `conv_in` / `conv_out` and the
time embedding (first and last layers, tiny compute, most sensitive). qwix intercepts `dot_general` /
`conv_general_dilated` inside the matching Flax modules (`module_path`), so the UNet's code is unchanged.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from animatediff_jax.errors import FieldError

Params = dict[str, Any]

UNET_QUANTIZE = ("none", "int8_weights", "int8")

# Module paths (qwix matches the whole path, '/'-joined) that stay unquantized: anything inside a motion
# module, and the UNet's (or ControlNet's) first and last layers and time / added embeddings.
_KEEP = r"(.*motion_modules_\d+.*|conv_in|conv_out|time_embedding/.*|add_embedding/.*|.*/time_emb_proj)"


def check_mode(mode: str) -> str:
    """`mode` if it is one of `UNET_QUANTIZE`; else a `FieldError` naming the setting `quantize`."""
    if mode not in UNET_QUANTIZE:
        raise FieldError("quantize", f"={mode!r}: expected one of {', '.join(UNET_QUANTIZE)}")
    return mode


def _qwix():
    try:
        import qwix
    except ImportError:
        raise FieldError("quantize", " needs qwix: pip install 'animatediff-jax[int8]'") from None
    return qwix


def _rules(mode: str) -> list:
    qwix = _qwix()

    act = jnp.int8 if mode == "int8" else None
    ops = ("dot_general", "conv_general_dilated") if act else ("dot_general",)
    return [qwix.QtRule(module_path=_KEEP, op_names=ops),  # first match wins: no weight_qtype = not quantized
            qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act, op_names=ops)]


def quantized(model: nn.Module, mode: str) -> nn.Module:
    """`model` whose spatial matmuls and convs run quantized by `mode` (itself for "none").
    Its params are `quantize_params`'s output (float params also work: quantized on every call)."""
    if check_mode(mode) == "none":
        return model
    qwix = _qwix()
    return qwix.quantize_model(model, qwix.PtqProvider(_rules(mode)))


def quantize_params(model: nn.Module, params: Params, mode: str, *example_args: Any, **example_kwargs: Any
                    ) -> Params:
    """`params` of `model` with the quantized layers' kernels replaced by int8 + per-channel scales (qwix's
    `WithAux` leaves; everything else the same arrays). `example_args` / `example_kwargs` are any inputs
    `model.init` takes (only the params' shapes matter: they are traced, not run). Leaves may be
    `ShapeDtypeStruct`s."""
    if check_mode(mode) == "none":
        return params
    qwix = _qwix()
    init = functools.partial(quantized(model, mode).init, **example_kwargs)
    abstract = jax.eval_shape(init, jax.random.key(0), *example_args)["params"]
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        return jax.eval_shape(lambda p: qwix.quantize_params(p, abstract), params)
    # Loaded checkpoints hold numpy arrays; qwix takes jax arrays only.
    return qwix.quantize_params(jax.tree.map(jnp.asarray, params), abstract)


def is_quantized(leaf: Any) -> bool:
    """True for a quantized kernel (qwix's `WithAux`: an int8 `QArray` and how it was made), which callers
    that cast or count leaves keep whole (`jax.tree.map(..., is_leaf=is_quantized)`). Without qwix imported
    nothing was quantized (and it is not imported for the question: it pulls in Pallas)."""
    ptq = sys.modules.get("qwix._src.providers.ptq")  # (`WithAux` is not re-exported by qwix)
    return ptq is not None and isinstance(leaf, ptq.WithAux)

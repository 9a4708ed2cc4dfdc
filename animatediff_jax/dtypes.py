"""One vocabulary of dtype names, accepted by every command and config.

`float32`/`fp32`/`f32`, `bfloat16`/`bf16`, `float16`/`fp16`/`half` all name the same three dtypes;
`canonical` gives the long name a run saves, `to_jnp` the JAX dtype. A leaf module.
"""

from __future__ import annotations

from typing import Any

from animatediff_jax.errors import FieldError

CANONICAL = ("float32", "bfloat16", "float16")
ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "full": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}


def canonical(name: Any, field: str = "dtype", allowed: tuple[str, ...] = CANONICAL) -> str:
    """The long name of dtype `name` (any alias, any case), one of `allowed`; else a one-line
    `FieldError` naming `field` and the names it takes."""
    full = ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None
    if full is None or full not in allowed:
        names = ", ".join(k for k, v in ALIASES.items() if v in allowed)
        raise FieldError(field, f"={name!r}: expected one of {names}")
    return full


def to_jnp(name: Any, field: str = "dtype") -> Any:
    """The JAX dtype of `name` (any alias)."""
    import jax.numpy as jnp

    return jnp.dtype(canonical(name, field))

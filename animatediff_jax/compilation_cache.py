"""JAX's persistent compilation cache, on by default for `train` and `sample`: a rerun (a resumed
run, the same sample config again) loads its compiled programs instead of compiling them again."""

from __future__ import annotations

import os

AUTO = "auto"
OFF = ("", "off", "false", "none", "no")  # (not folder names: a user writing `=false` means off)


def default_dir() -> str:
    """The user's cache folder for compiled programs (`$XDG_CACHE_HOME/animatediff-jax/jax`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "animatediff-jax", "jax")


def enable(setting: str, auto: str) -> str | None:
    """Points JAX's compilation cache at `setting` ("auto": `auto`; "" or "off": off) unless the process
    (or `JAX_COMPILATION_CACHE_DIR`) already chose one. Returns the folder in use, or None."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if setting.strip().lower() in OFF:
        return None
    folder = auto if setting == AUTO else setting
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder

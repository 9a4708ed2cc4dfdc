"""Writing files and folders so that a failure never destroys what was there.

Every writer of weights goes through these: the new content is written under a temporary name in
the same folder (same filesystem, so the final `os.replace` is atomic), and only a complete write
replaces the old file. A write that fails (disk full, `ulimit -f`, an exception) removes its
temporary and leaves the previous file byte for byte; a folder is complete or absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path` atomically, on error it is removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary folder to fill; on success it becomes `path` (an existing `path` is replaced
    only then, and removed after), on error it is removed: `path` is complete or as it was."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.lexists(path):
            old = _tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), *, overwrite: bool = False,
                 flag: str = "--overwrite") -> None:
    """Refuses to write over an input, or over an existing `out` unless `overwrite` (raises `FileExistsError`)."""
    out = os.path.realpath(os.fspath(out))
    for src in inputs:
        src = os.path.realpath(os.fspath(src))
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            raise FileExistsError(f"{out}: is the input {src} (or holds it); write the output elsewhere")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out}: exists; pass {flag} to replace it")

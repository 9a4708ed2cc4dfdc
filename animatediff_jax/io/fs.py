"""Every file this package reads or writes, local or in a bucket, and writes that never destroy what was there.

Paths. A path with a bucket scheme (`gs://bucket/x`, also `s3://`, `az://`, `hf://`) is *remote* and
goes through `etils.epath`, as orbax's checkpoints do: its fsspec backend, so gs:// needs `gcsfs`
(the `gcs` extra; with TensorFlow installed epath takes `tf.io.gfile` instead) and Google
credentials (on a Cloud TPU VM its service account). Any other path is local and goes
through `os` / `open` exactly as before, so local behaviour and error messages are unchanged. Path
strings are joined with `os.path.join` either way (`gs://b/x` + `y` is `gs://b/x/y`); never
`os.path.abspath` / `normpath` a remote path (`abspath` here leaves it alone).

Libraries that only take local file names (safetensors' `safe_open`, `torch.load`, PyAV, Pillow,
ArrayRecord, transformers' tokenizers, tensorboardX) see a local copy: `local_file` (a temporary
copy, removed after), `local_copy` (a copy kept for this host, e.g. a latent cache's shards or a
tokenizer folder, downloaded once), `local_output` / `atomic_file` (written locally, then uploaded),
`SyncedFolder` (a local folder uploaded file by file, for logs).

Atomic writes. Locally, new content is written under a temporary name in the same folder (same
filesystem, so the final `os.replace` is atomic), and only a complete write replaces the old file.
A write that fails (disk full, `ulimit -f`, an exception) removes its temporary and leaves the
previous file byte for byte; a folder is complete or absent.
In a bucket, a file is written locally, uploaded under a temporary name beside its destination and
then renamed over it (on GCS a rename is a server-side copy: the destination object is replaced
whole, never seen half written). A failed write or upload leaves the previous object as it was
(its temporary is removed when possible). A *folder* in a bucket is filled locally, then the old
one is removed and the files are uploaded one by one (each as a file above): a failure while
filling leaves the old folder untouched, but a failure during the upload leaves the folder partial
(an object store has no atomic rename of a prefix).

Every writer of the commands goes through these: `atomic_file`, `atomic_folder`, `local_output` (also
for a local path: a temporary beside it, keeping its extension for libraries that read it) and
`open(p, "w")` (the file appears, complete, when it is closed without an error). Their temporaries
are registered with `animatediff_jax.interrupts`, which removes them when a command is stopped by
Ctrl-C / SIGTERM (also when the process ends without unwinding); each commit (the final rename) runs
in `interrupts.critical()`, so a signal cannot cut it in half, and is recorded as written.

Outputs the user names: `check_output` is the one rule of every command (an existing output only
with `--overwrite`, never an input).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import IO, Any, Iterable, Iterator

from animatediff_jax import interrupts

PathLike = str | os.PathLike
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # what etils.epath dispatches to a bucket backend
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- paths


def is_remote(p: PathLike) -> bool:
    """Whether `p` names a bucket object (`gs://...`, `s3://...`, ...) rather than a local path."""
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def path(p: PathLike):
    """`p` as an `etils.epath.Path` (its gs:// backend for bucket paths, `os` for local ones)."""
    from etils import epath

    return epath.Path(p)


def abspath(p: PathLike) -> str:
    """`os.path.abspath` for a local path; a bucket path as it is (already absolute)."""
    p = os.fspath(p)
    return p.rstrip("/") if is_remote(p) else os.path.abspath(p)


def _fresh(p: PathLike):
    """`path(p)`, its bucket listings not cached (gcsfs caches them per process: what another host
    wrote since, e.g. its cache shards, would go unseen)."""
    from etils.epath import backend

    with contextlib.suppress(Exception):  # (tf.io.gfile or another backend: nothing cached)
        backend.fsspec_backend.fs(os.fspath(p)).invalidate_cache(os.fspath(p))
    return path(p)


def exists(p: PathLike) -> bool:
    return _fresh(p).exists() if is_remote(p) else os.path.exists(p)


def isdir(p: PathLike) -> bool:
    """For a bucket path: whether objects exist under the prefix `p/` (buckets have no empty folders)."""
    return _fresh(p).is_dir() if is_remote(p) else os.path.isdir(p)


def isfile(p: PathLike) -> bool:
    if is_remote(p):
        q = _fresh(p)
        return q.exists() and not q.is_dir()
    return os.path.isfile(p)


def listdir(p: PathLike) -> list[str]:
    """The names in folder `p` (for a bucket, one level of the prefix); a missing one is FileNotFoundError."""
    if not is_remote(p):
        return os.listdir(p)
    if not isdir(p):
        raise FileNotFoundError(f"{os.fspath(p)}: no such folder")
    return [q.name for q in path(p).iterdir() if q.name]


def open(p: PathLike, mode: str = "r", *, encoding: str | None = None, newline: str | None = None) -> IO[Any]:  # noqa: A001
    """`open` for a local path; for a bucket object a stream ('r', 'rb', 'w', 'wb'; text is UTF-8 unless
    `encoding`). Writing ('w', 'wb') is atomic, local or remote: the file is written under a temporary
    name and replaces `p` when it is closed (or its `with` block ends) without an error; a block that
    raised leaves `p` as it was. Appending ('a') is a plain local `open`."""
    kw = {k: v for k, v in (("encoding", encoding), ("newline", newline)) if v is not None}
    if mode.replace("t", "").replace("b", "") == "w":
        return _AtomicWriter(p, mode, kw)
    if not is_remote(p):
        return builtins.open(p, mode, **kw)
    binary = mode.replace("t", "").replace("b", "")
    if binary != "r":
        raise ValueError(f"{os.fspath(p)}: mode {mode!r} is not supported for a bucket path (r, rb, w, wb)")
    f = path(p).open("rb")
    if "b" in mode:
        return f
    return io.TextIOWrapper(f, encoding=encoding or "utf-8", newline=newline)


class _AtomicWriter:
    """A file open for writing through `atomic_file`: committed by `close()` / the end of a `with` block,
    discarded when the block raised (or the object is dropped unclosed)."""

    def __init__(self, p: PathLike, mode: str, kw: dict):
        self._cm = atomic_file(p)
        tmp = self._cm.__enter__()
        try:
            self._f = builtins.open(tmp, mode, **kw)
        except BaseException:
            self._cm.__exit__(*sys.exc_info())
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb) -> bool:
        self._finish(et, ev, tb)
        return False

    def close(self) -> None:
        self._finish(None, None, None)

    @property
    def closed(self) -> bool:
        return self._cm is None

    def _finish(self, et, ev, tb) -> None:
        cm, self._cm = self._cm, None
        if cm is None:
            return
        try:
            self._f.close()
        except BaseException:
            if et is None:
                cm.__exit__(*sys.exc_info())
                raise
        if et is None:
            cm.__exit__(None, None, None)
        else:
            cm.__exit__(et, ev if ev is not None else et(), tb)

    def __del__(self):
        if getattr(self, "_cm", None) is not None:  # never closed: not complete, not committed
            with contextlib.suppress(Exception):
                self._finish(RuntimeError, RuntimeError("not closed"), None)


def read_bytes(p: PathLike) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p` in one go (atomically: see `atomic_file`)."""
    with atomic_file(p) as tmp, builtins.open(tmp, "wb") as f:
        f.write(data)


def makedirs(p: PathLike, exist_ok: bool = True) -> None:
    """`os.makedirs`; for a bucket nothing to do (folders exist through the objects in them)."""
    if is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=exist_ok)


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves file or folder `src` to `dst` (a file replacing `dst`): `os.replace` locally. In a bucket a
    file is copied and deleted (a server-side rename); a folder is copied object by object, then removed."""
    if not (is_remote(src) or is_remote(dst)):
        os.replace(src, dst)
    elif isdir(src):
        copytree(src, dst)
        rmtree(src)
    else:
        path(src).replace(os.fspath(dst))


def remove(p: PathLike, missing_ok: bool = False) -> None:
    """Removes one file (a missing one is FileNotFoundError unless `missing_ok`)."""
    if is_remote(p):
        path(p).unlink(missing_ok=missing_ok)
    elif not missing_ok or os.path.lexists(p):
        os.remove(p)


def rmtree(p: PathLike) -> None:
    """Removes a folder and everything in it (nothing if it is not there)."""
    if is_remote(p):
        if exists(p):
            path(p).rmtree(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copies one file, local or in a bucket on either side (not atomic: see `put` / `atomic_file`)."""
    if not (is_remote(src) or is_remote(dst)):
        shutil.copyfile(src, dst)
        return
    with open(src, "rb") as fi, _stream(dst) as fo:  # (not `open(dst, "wb")`: that is atomic, through here)
        shutil.copyfileobj(fi, fo, _CHUNK)


def _stream(p: PathLike) -> IO[bytes]:
    """A plain binary write stream: a local file, or a bucket object (it appears when the stream closes)."""
    return path(p).open("wb") if is_remote(p) else builtins.open(p, "wb")


def walk_files(p: PathLike) -> list[str]:
    """The files under folder `p`, as paths relative to it (`/`-separated), in name order."""
    out = []
    for name in sorted(listdir(p)):
        q = os.path.join(os.fspath(p), name)
        if isdir(q):
            out += [f"{name}/{r}" for r in walk_files(q)]
        else:
            out.append(name)
    return out


def copytree(src: PathLike, dst: PathLike) -> None:
    """Copies folder `src` into `dst` (merging with what is there), local or in a bucket on either side."""
    if not (is_remote(src) or is_remote(dst)):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    for rel in walk_files(src):
        target = os.path.join(os.fspath(dst), rel)
        if not is_remote(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy_file(os.path.join(os.fspath(src), rel), target)


# ----------------------------------------------------------------------------- local copies


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local file name with `p`'s content for the block: `p` itself when local; a bucket object is
    downloaded to a temporary file (same base name, so extensions still tell formats apart), removed after."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    tmp = tempfile.mkdtemp(prefix="animatediff-jax-")
    try:
        local = os.path.join(tmp, os.path.basename(os.fspath(p).rstrip("/")) or "file")
        copy_file(p, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_cache_root() -> str:
    """Where `local_copy` keeps its copies: `$ANIMATEDIFF_JAX_LOCAL_CACHE`, else a folder in the temp dir."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    return os.environ.get("ANIMATEDIFF_JAX_LOCAL_CACHE") or os.path.join(tempfile.gettempdir(), f"animatediff-jax-{user}")


def local_copy(p: PathLike, names: Iterable[str] | None = None) -> str:
    """A local path with `p`'s content, kept for this host: `p` itself when local. A bucket file, or
    a bucket folder (its files `names`, relative to it; all of them when None), is downloaded once
    under `local_cache_root()` and reused while each object's size and modification time are the
    ones recorded when it was downloaded (else downloaded again)."""
    if not is_remote(p):
        return os.fspath(p)
    p = os.fspath(p).rstrip("/")
    home = os.path.join(local_cache_root(), hashlib.sha1(p.encode()).hexdigest()[:16])
    root = os.path.join(home, os.path.basename(p) or "root")
    stamps_path = os.path.join(home, "stamps.json")
    try:
        with builtins.open(stamps_path) as f:
            stamps = json.load(f)
    except (OSError, ValueError):
        stamps = {}
    single = isfile(p)
    todo = [("", p, root)] if single else [
        (rel, os.path.join(p, rel), os.path.join(root, rel)) for rel in (walk_files(p) if names is None else names)]
    changed = False
    for rel, src, dst in todo:
        st = path(src).stat()
        stamp = [st.length, st.mtime]
        if not (st.mtime and stamps.get(rel) == stamp and os.path.isfile(dst) and os.path.getsize(dst) == st.length):
            with atomic_file(dst) as tmp:
                copy_file(src, tmp)
            stamps[rel], changed = stamp, True
    if changed:
        with atomic_file(stamps_path) as tmp, builtins.open(tmp, "w") as f:
            json.dump(stamps, f)
    if not single:
        os.makedirs(root, exist_ok=True)
    return root


@contextlib.contextmanager
def local_output(p: PathLike) -> Iterator[str]:
    """A local file name to write `p` through (for libraries that write by file name: Pillow, PyAV):
    a temporary beside `p` with `p`'s extension (so a writer that picks its format by extension still
    does), put in place when the block succeeds, removed when it fails (as `atomic_file`); for a bucket
    path a temporary local file, uploaded when the block succeeds."""
    if is_remote(p):
        with atomic_file(p) as tmp:
            yield tmp
        return
    with atomic_file(p, keep_extension=True) as tmp:
        yield tmp


class SyncedFolder:
    """A local folder standing for `folder`: `folder` itself when local; for a bucket folder a local
    one whose files `sync()` uploads whole (those changed since the last sync), for writers that append
    (logs, TensorBoard event files). `fetch(name)` first downloads a file the bucket holds already."""

    def __init__(self, folder: PathLike):
        self.remote = os.fspath(folder) if is_remote(folder) else None
        self.path = tempfile.mkdtemp(prefix="animatediff-jax-sync-") if self.remote else os.fspath(folder)
        self._synced: dict[str, tuple[int, int]] = {}

    def fetch(self, name: str) -> None:
        if self.remote and exists(os.path.join(self.remote, name)):
            local = os.path.join(self.path, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            copy_file(os.path.join(self.remote, name), local)
            st = os.stat(local)
            self._synced[name] = (st.st_size, st.st_mtime_ns)

    def sync(self) -> None:
        if not self.remote:
            return
        for rel in walk_files(self.path):
            st = os.stat(os.path.join(self.path, rel))
            if self._synced.get(rel) != (st.st_size, st.st_mtime_ns):
                put(os.path.join(self.path, rel), os.path.join(self.remote, rel), keep=True)
                self._synced[rel] = (st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        if self.remote:
            self.sync()
            shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------- atomic writes


def _tmp_name(path: str, keep_extension: bool = False) -> str:
    """`.NAME.tmp-PID-RANDOM` beside `path` (`.STEM.tmp-PID-RANDOM.EXT` with `keep_extension`)."""
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_remote(path):
        head, tail = path.rstrip("/").rsplit("/", 1)
        return f"{head}/.{tail}.{tag}"
    head, tail = os.path.split(os.path.abspath(path))
    if keep_extension:
        stem, ext = os.path.splitext(tail)
        return os.path.join(head, f".{stem}.{tag}{ext}")
    return os.path.join(head, f".{tail}.{tag}")


def put(local: str, dst: PathLike, keep: bool = False) -> None:
    """Moves the finished local file `local` to `dst` atomically: `os.replace` when `dst` is local
    (same filesystem assumed); for a bucket, an upload under a temporary name beside `dst` renamed over
    it. `keep`: leave `local` where it is (bucket destinations only)."""
    dst = os.fspath(dst)
    if not is_remote(dst):
        with interrupts.critical():
            os.replace(local, dst)
            interrupts.forget(local)
            interrupts.wrote(dst)
        return
    tmp = _tmp_name(dst)
    try:
        copy_file(local, tmp)
        with interrupts.critical():
            rename(tmp, dst)
            interrupts.wrote(dst)
    except BaseException:
        with contextlib.suppress(Exception):
            remove(tmp, missing_ok=True)
        raise
    if not keep:
        os.remove(local)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, keep_extension: bool = False) -> Iterator[str]:
    """Yields a temporary (local) path to write; on success it replaces `path` atomically, on error it
    is removed. A bucket `path` is uploaded from a local temporary (see the module docstring).
    `keep_extension`: the temporary ends with `path`'s extension (for writers that go by it)."""
    path = os.fspath(path)
    if is_remote(path):
        folder = tempfile.mkdtemp(prefix="animatediff-jax-")
        interrupts.temporary(folder)
        try:
            tmp = os.path.join(folder, os.path.basename(path.rstrip("/")))
            yield tmp
            put(tmp, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            interrupts.forget(folder)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path, keep_extension)
    interrupts.temporary(tmp)
    try:
        yield tmp
        with interrupts.critical():
            os.replace(tmp, path)
            interrupts.forget(tmp)
            interrupts.wrote(path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        interrupts.forget(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary folder to fill; on success it becomes `path` (an existing `path` is replaced
    only then, and removed after), on error it is removed: `path` is complete or as it was. A bucket
    `path` is filled locally, then replaces the old one file by file (not atomic as a whole: see the
    module docstring)."""
    path = os.fspath(path)
    if is_remote(path):
        folder = tempfile.mkdtemp(prefix="animatediff-jax-")
        interrupts.temporary(folder)
        try:
            yield folder
            rmtree(path)
            for rel in walk_files(folder):
                put(os.path.join(folder, rel), f"{path.rstrip('/')}/{rel}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            interrupts.forget(folder)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    interrupts.temporary(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        with interrupts.critical():  # `path` is briefly absent between the renames: not cut there
            if os.path.lexists(path):
                old = _tmp_name(path)
                os.replace(path, old)
                interrupts.temporary(old)  # (removed below, or by an interruption's cleanup)
            os.replace(tmp, path)
            interrupts.forget(tmp)
            interrupts.wrote(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
            interrupts.forget(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        interrupts.forget(tmp)
        raise


def _empty_folder(p: PathLike) -> bool:
    try:
        return isdir(p) and not listdir(p)
    except OSError:
        return False


def check_output(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (), *, overwrite: bool = False,
                 flag: str = "--overwrite") -> None:
    """The one overwrite rule of every command that writes an output the user names (`convert`,
    `export`, `prepare`, `evaluate --out`): never over an input (`out` is one, or a folder holding one, which
    replacing it would destroy: a `FileExistsError` even with `overwrite`; writing *into* an input
    folder is fine), and over an existing `out` (an empty folder does not count) only with
    `overwrite`; each refusal is one line naming the path (and `flag`). Call it before anything long
    starts."""
    if is_remote(out) or any(is_remote(s) for s in inputs):
        out = os.fspath(out).rstrip("/")
        for src in inputs:
            src = os.fspath(src).rstrip("/")
            if out == src or src.startswith(out + "/"):
                raise FileExistsError(f"{out}: is the input {src} (or holds it); write the output elsewhere")
        if exists(out) and not overwrite and not _empty_folder(out):
            raise FileExistsError(f"{out}: exists; pass {flag} to replace it")
        return
    given = os.fspath(out)
    out = os.path.realpath(given)
    for src in inputs:
        src = os.path.realpath(os.fspath(src))
        if out == src or src.startswith(out + os.sep):
            raise FileExistsError(f"{given}: is the input {src} (or holds it); write the output elsewhere")
    if os.path.lexists(out) and not overwrite and not _empty_folder(out):
        raise FileExistsError(f"{given}: exists; pass {flag} to replace it")

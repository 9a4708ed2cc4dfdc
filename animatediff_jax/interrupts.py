"""Ctrl-C (SIGINT) and SIGTERM for every command: one line, exit code 130, nothing half written.

`cli.run_command` runs each command inside `handling()`, which installs one handler for both signals
(main thread only) and catches the `KeyboardInterrupt` at the command boundary:

* The handler raises `KeyboardInterrupt` in the main thread at the next Python bytecode (not inside
  `critical()`: the renames that commit an atomic write finish first). It unwinds through the
  command: every atomic writer (`io.fs.atomic_file`, `atomic_folder`, `local_output`, `open(.., "w")`)
  removes its temporary, `finally` blocks run (progress bars close). Where Python cannot raise it
  (a garbage-collector callback such as jax's `_xla_gc_callback`, a `__del__`: "Exception ignored
  in ..." and the interrupt lost), `sys.unraisablehook` takes it silently and the watcher thread
  delivers the signal again a moment later (`_thread.interrupt_main`), to be raised at an ordinary
  bytecode.
* At the boundary `exit_interrupted` removes any temporary still registered, prints ONE line on
  stderr (`interrupted (SIGINT); nothing written`, or which complete files this run wrote and where)
  and ends the process with `os._exit(130)`: no interpreter shutdown, so XLA's compiler and
  runtime threads, still running, cannot crash it on the way out (a plain `sys.exit` / traceback
  during a compilation ends in a segfault, rc -11).
* While the main thread is blocked in C++ (an XLA compilation, a device wait such as the whole
  denoising loop, which is one compiled call) Python runs no signal handler at all. The C-level
  handler still writes the signal number to a wakeup socket (`signal.set_wakeup_fd`); a watcher
  thread reads it and, if the main thread has not reached the boundary within `GRACE_S` seconds,
  does the same cleanup and exit itself. A second signal ends the process at once the same way.

Only signals whose current Python handler is ours are handled: `train`'s `StopRequest` installs its
own while the training loop runs (finish the step, save, exit 0), and the watcher leaves those alone.
Exit code 130 (128 + SIGINT, the shell's convention for Ctrl-C) for SIGTERM too. This module imports
only the standard library (`io.fs` imports it).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

EXIT_INTERRUPTED = 130
GRACE_S = 2.0  # how long the main thread may take to reach the command boundary before the watcher acts
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()  # guards the registries below
_exit_lock = threading.Lock()  # whoever takes it ends the process
_temporaries: dict[str, None] = {}  # local temporary files/folders being written (ordered set)
_written: list[str] = []  # files/folders committed by this command
_outputs: list[str] = []  # where this command writes (declared by it: the message names what is there)
_fresh: list[str] = []  # declared output folders that did not exist then (removed if left empty)
_notes: list[Callable[[], str | None]] = []  # extra words for the line (e.g. how to resume)
_cleanups: list[Callable[[], None]] = []  # run on an interruption (e.g. a writer's own temporaries)


class _State:
    depth = 0  # nesting of handling()
    signum: int | None = None  # the first signal received (while ours): named in the line
    raised = False  # the Python handler ran (and raised, or will at the end of critical())
    redelivered = 0  # re-delivered signals not yet read back by the watcher (not a second signal)
    redeliveries = 0  # in all, at most MAX_REDELIVERIES
    previous_hook = None  # sys.unraisablehook before ours
    critical = 0  # nesting of critical() in the main thread
    pending = False  # a signal arrived inside critical(): raise when it ends
    previous: dict[int, object] = {}
    wakeup: tuple[socket.socket, socket.socket] | None = None
    old_wakeup = -1
    watcher: threading.Thread | None = None


# ----------------------------------------------------------------------------- registries (used by io.fs)


def _norm(path) -> str:
    """A local path made absolute (so what commands declare and what writers record compare); a bucket
    path (`gs://...`) as it is."""
    path = os.fspath(path)
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def temporary(path: str) -> None:
    """`path` (local) is being written under a temporary name: removed if the process is interrupted."""
    with _lock:
        _temporaries[os.path.abspath(path)] = None


def forget(path: str) -> None:
    """`path` is no longer a temporary (committed, or removed by its writer)."""
    with _lock:
        _temporaries.pop(os.path.abspath(path), None)


def wrote(path: str) -> None:
    """A complete output was committed at `path` (what an interrupted command says it kept)."""
    if _State.depth:
        with _lock:
            _written.append(_norm(path))


def output(path: str, note: Callable[[], str | None] | None = None) -> None:
    """This command writes under `path` (a file or folder): an interruption names the complete files
    written there by this run; `note()` may add words (e.g. "rerun the same command to resume")."""
    if _State.depth:
        with _lock:
            _outputs.append(_norm(path))
            if "://" not in _outputs[-1] and not os.path.lexists(_outputs[-1]):
                _fresh.append(_outputs[-1])
            if note is not None:
                _notes.append(note)


def received() -> bool:
    """Whether a SIGINT/SIGTERM of ours arrived during this command (one the command went on past, e.g.
    swallowed by a library's `except BaseException`, still ends it: `cli.run_command` checks)."""
    return _State.depth > 0 and _State.signum is not None


def on_interrupt(cleanup: Callable[[], None]) -> None:
    """`cleanup()` runs (once, errors ignored) if this command is interrupted: for temporaries that a
    writer outside `io.fs` makes."""
    if _State.depth:
        with _lock:
            _cleanups.append(cleanup)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A block a signal must not cut (the renames that commit an atomic write): in the main thread a
    signal inside it raises `KeyboardInterrupt` only when it ends; the watcher waits for it too."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _State.critical += 1
    try:
        yield
    finally:
        if main:
            _State.critical -= 1
            if _State.critical == 0 and _State.pending:
                _State.pending = False
                raise KeyboardInterrupt


# ----------------------------------------------------------------------------- the handler and the watcher


def _handler(signum, frame) -> None:
    if _State.raised:
        return  # a second signal: the watcher ends the process now
    _State.raised = True
    _State.signum = _State.signum or signum
    if _State.critical:
        _State.pending = True
        return
    raise KeyboardInterrupt


MAX_REDELIVERIES = 100
_REDELIVER = 0  # the byte `_unraisable` writes to the wakeup socket: "deliver the signal again"


def _unraisable(unraisable) -> None:
    """Our `KeyboardInterrupt`, raised where Python only reports it (a gc callback, `__del__`): taken
    silently; the watcher delivers the signal again, to be raised at a point that can raise."""
    if unraisable.exc_type is KeyboardInterrupt and _State.raised and _State.depth and _State.wakeup is not None \
            and _State.redeliveries < MAX_REDELIVERIES and threading.current_thread() is threading.main_thread():
        _State.raised = False
        with contextlib.suppress(OSError):
            _State.wakeup[1].send(bytes([_REDELIVER]))
        return
    hook = _State.previous_hook or sys.__unraisablehook__
    hook(unraisable)


def _redeliver() -> None:
    time.sleep(0.02)  # (out of the gc callback / __del__ by then)
    if _State.raised or _State.wakeup is None:
        return
    with _lock:
        _State.redelivered += 1
        _State.redeliveries += 1
    with contextlib.suppress(Exception):
        _thread.interrupt_main(_State.signum or signal.SIGINT)


def _ours(signum: int) -> bool:
    try:
        return signal.getsignal(signum) is _handler
    except (ValueError, OSError):
        return False


def _watch(sock: socket.socket) -> None:
    """Reads the signal numbers the C-level handler writes; acts when the main thread cannot."""
    seen, deadline = 0, None
    while True:
        try:
            # (after a signal: wake every 0.1 s to freeze progress bars begun since, until the deadline)
            sock.settimeout(None if deadline is None else min(0.1, max(0.001, deadline - time.monotonic())))
            data = sock.recv(64)
        except (socket.timeout, BlockingIOError):
            data = None
        except OSError:
            return  # closed: the command ended
        if data == b"":
            return
        for signum in data or b"":
            if signum == _REDELIVER:
                _redeliver()
                continue
            with _lock:
                again = _State.redelivered > 0
                if again:
                    _State.redelivered -= 1
            if again:
                continue  # re-delivered by _unraisable, not a second signal
            if signum in SIGNALS and _ours(signum):
                seen += 1
                if _State.signum is None:
                    _State.signum = signum
                deadline = deadline or time.monotonic() + GRACE_S
        if deadline is not None:
            _freeze_progress_bars()
        if seen >= 2 or (deadline is not None and time.monotonic() >= deadline):
            t0 = time.monotonic()
            while _State.critical and time.monotonic() - t0 < 30:  # let a commit (a rename) finish
                time.sleep(0.01)
            exit_interrupted()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Installs the SIGINT/SIGTERM handling for a command (nested calls share the outer one). Outside
    the main thread nothing is installed (a `KeyboardInterrupt` is still caught by `run_command`)."""
    if _State.depth or threading.current_thread() is not threading.main_thread():
        _State.depth += 1
        try:
            yield
        finally:
            _State.depth -= 1
        return
    _State.depth, _State.signum, _State.raised, _State.pending = 1, None, False, False
    _State.redelivered = _State.redeliveries = 0
    _install()
    try:
        yield
    finally:
        _uninstall()
        _State.depth = 0
        with _lock:
            for registry in (_written, _outputs, _fresh, _notes, _cleanups):
                registry.clear()


def _install() -> None:
    _State.previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    _State.previous = {}
    for sig in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            _State.previous[sig] = signal.signal(sig, _handler)
    try:
        r, w = socket.socketpair()
        r.setblocking(True)
        w.setblocking(False)
        _State.old_wakeup = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    _State.wakeup = (r, w)
    _State.watcher = threading.Thread(target=_watch, args=(r,), name="animatediff-jax-interrupts", daemon=True)
    _State.watcher.start()


def _uninstall() -> None:
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _State.previous_hook or sys.__unraisablehook__
    for sig, handler in _State.previous.items():
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _State.previous = {}
    if _State.wakeup is not None:
        r, w = _State.wakeup
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(_State.old_wakeup)
        for s in (w, r):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        _State.wakeup = None
        if _State.watcher is not None:
            _State.watcher.join(timeout=1.0)
            _State.watcher = None


# ----------------------------------------------------------------------------- the end


def _cleanup() -> None:
    with _lock:
        temps, cleanups, fresh = list(_temporaries), list(_cleanups), list(_fresh)
        _temporaries.clear()
        _cleanups.clear()
    for p in reversed(temps):
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.remove(p)
    for fn in cleanups:
        with contextlib.suppress(Exception):
            fn()
    for folder in fresh:  # made by this run and still empty (e.g. sample/ before its first video): gone
        for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(root)  # (only an empty folder)


def _under(p: str, folder: str) -> bool:
    return p == folder or p.startswith(folder.rstrip("/\\") + "/") or p.startswith(folder.rstrip("/\\") + os.sep)


def message(signum: int | None = None) -> str:
    """The one line: `interrupted (SIGINT); nothing written`, or `...; kept N complete file(s) in DIR: a, b`."""
    signum = _State.signum if signum is None else signum
    try:
        name = signal.Signals(signum).name if signum is not None else "KeyboardInterrupt"
    except ValueError:
        name = str(signum)
    with _lock:
        written, outputs, notes = list(dict.fromkeys(_written)), list(_outputs), list(_notes)
    if outputs:
        written = [p for p in written if any(_under(p, o) for o in outputs)]
    if written:
        roots = [o for o in outputs if any(_under(p, o) for p in written)]
        base = roots[0] if len(roots) == 1 else os.path.commonpath(written) if len(written) > 1 else \
            os.path.dirname(written[0])
        if base in written and len(written) == 1:  # the output itself (a file or folder) is complete
            what = f"wrote {base} (complete) before stopping"
        else:
            names = [p[len(base):].lstrip("/") if "://" in p else os.path.relpath(p, base) for p in written]
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            what = f"kept {len(written)} complete file(s) in {base}: {shown}; nothing partial"
    else:
        what = "nothing written"
    extra = []
    for note in notes:
        with contextlib.suppress(Exception):
            words = note()
            if words:
                extra.append(words)
    return f"interrupted ({name}); " + "; ".join([what] + extra)


def _progress_bars() -> list:
    tqdm = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None) if tqdm is not None else None
    with contextlib.suppress(Exception):
        return list(bars or ())
    return []


def _freeze_progress_bars() -> None:
    """No more progress-bar updates once stopped (the work goes on in XLA's threads meanwhile)."""
    for bar in _progress_bars():
        with contextlib.suppress(Exception):
            bar.disable = True


def exit_interrupted(signum: int | None = None) -> NoReturn:
    """Removes the registered temporaries, prints the one line, ends the process with 130 (`os._exit`:
    no interpreter shutdown while XLA threads run). Called by `cli.run_command` on `KeyboardInterrupt`
    and by the watcher thread; whichever comes first ends the process."""
    _exit_lock.acquire()  # the other caller, if any, waits here until the process is gone
    _cleanup()
    line = message(signum)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    prefix = "\n" if _progress_bars() else ""  # a progress bar left mid-line: start the line on its own
    with contextlib.suppress(Exception):
        os.write(2, (prefix + line + "\n").encode("utf-8", "replace"))
    os._exit(EXIT_INTERRUPTED)

"""Train-state checkpoints (orbax) and per-stage exports of the trained params (params files).

A checkpoint step directory holds three items, written atomically by orbax (a step that was
being written when the run died is a temporary directory that restores ignore):

* `state`: step, trainable params, optimizer state, RNG key data (sharded arrays, each process
  writing its own shards);
* `data`: each process's data-iterator state as `process_{i}-of-{n}.json`;
* `config`: the run's config as JSON (for humans; never read back).

Exports (`export_trainable`) are `params_io` files holding `{"unet": <trained tree>}`: a LoRA
(`{"down", "up"}` leaves) for stages 1 and 3, the motion-module subtrees for stage 2.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict

from animatediff_jax import parallel
from animatediff_jax.checkpoints import params_io
from animatediff_jax.io import fs
from animatediff_jax.training.config import ConfigError, TrainingError
from animatediff_jax.training.step import TrainState


def _encode_state(state: Any) -> Any:
    """JSON-able form of an iterator state (grain's are dicts; DataLoader ones are bytes)."""
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(state)).decode("ascii")}
    return state


def _decode_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Writes one JSON file per process (data-iterator states differ per process)."""

    def save(self, directory: epath.Path, args: "ProcessJsonSave") -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(_encode_state(args.state)))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None) -> Any:
        path = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no data-iterator state for this process (process count changed?)")
        return _decode_state(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


class Checkpointer:
    """orbax `CheckpointManager`: saves every `every` steps (async), keeps the last `keep` (older
    steps go only once a newer one has committed and passes `damage`; at the next save or `close`).

    `save` returns at once when async (the device arrays are copied first, so the train state
    may be donated to the next step); call `wait` before reading the files, `close` at the end.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = fs.abspath(directory)  # a bucket path (gs://) as it is: orbax writes it through epath
        self.every = max(1, int(every))
        self.keep = int(keep) if keep and keep > 0 else None
        self._saved = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours (`_rotate`): never past the newest intact step
            enable_async_checkpointing=bool(async_save),
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ProcessJsonHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, force: bool = False) -> bool:
        return force or step % self.every == 0

    def save(self, step: int, state: TrainState, data_state: Any = None, config: Mapping | None = None,
             force: bool = False) -> bool:
        """Saves if `step` is a multiple of `every` (or `force`); returns whether a save started."""
        if not force and step % self.every:
            return False
        items = {"state": ocp.args.StandardSave(_state_dict(state)), "data": ProcessJsonSave(data_state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=str)))
        self.manager.wait_until_finished()  # the previous save has committed: rotate among committed steps
        self._rotate()
        self._saved = True
        # The decision is ours (orbax's default policy would also save the first step).
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def _rotate(self) -> None:
        """Keeps the newest `keep` committed steps, and deletes older ones only when the newest
        passes `damage` (so rotation never removes the last intact checkpoint)."""
        steps = sorted(self.all_steps())
        if self.keep is None or len(steps) <= self.keep:
            return
        reason = self.damage(steps[-1])
        if reason is not None:
            if jax.process_index() == 0:
                print(f"[train] warning: newest checkpoint step {steps[-1]} looks damaged ({reason[:200]}); "
                      f"keeping the older ones", file=sys.stderr, flush=True)
            return
        for old in steps[: -self.keep]:
            self.manager.delete(old)

    def restore(self, like: TrainState, step: int | None = None, config: Mapping | None = None
                ) -> tuple[TrainState, Any] | None:
        """`(state, data_state)` of `step` (default: the newest intact one), laid out like `like`;
        None if none saved.

        `like` supplies structure, dtypes and shardings (arrays or `ShapeDtypeStruct`s with shardings).
        Without `step`, a damaged newest checkpoint (missing files, unreadable metadata, truncated
        shards) is moved aside to `<workdir>/checkpoints_damaged/<step>` (never deleted) with one
        warning line, and the next newest is tried. A checkpoint that reads fine but does not match
        `like` (the config changed) raises ConfigError and is left where it is; with `config` (the
        run's config as a dict) that error names the fields that differ from the saved config.
        """
        if step is not None:
            return self._restore(like, int(step))
        for step in sorted(self.all_steps(), reverse=True):
            try:
                reason = self.damage(step, like)
            except ConfigError as e:
                changed = self.changed_fields(step, config) if config is not None else []
                if not changed:
                    raise
                raise ConfigError(f"{e}; changed since it was saved: {', '.join(changed[:6])}"
                                  f"{', ...' if len(changed) > 6 else ''}") from None
            if reason is None:
                try:
                    out = self._restore(like, step)
                except Exception as e:  # the metadata matched, so the data is what is broken
                    out, reason = None, f"{type(e).__name__}: {_one_line(e)}"
            if _all_processes(reason is None):
                return out
            reason = reason or "unreadable on another process"
            self._move_aside(step, reason)
        return None

    def changed_fields(self, step: int, config: Mapping) -> list[str]:
        """`field: saved -> now` for each config field (outside workdir/steps/checkpoint/log) that differs
        from the config saved with checkpoint `step` (empty when none was saved)."""
        try:
            saved = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001  (an older checkpoint without a config item)
            return []

        def flat(d, prefix=""):
            out = {}
            for k, v in dict(d).items():
                if isinstance(v, Mapping):
                    out.update(flat(v, f"{prefix}{k}."))
                else:
                    out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))
            return out

        ignore = ("workdir", "train.steps", "checkpoint.", "log.", "data.")
        a, b = flat(saved), flat(json.loads(json.dumps(dict(config), default=str)))
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and not k.startswith(ignore)]

    def damage(self, step: int, like: TrainState | None = None) -> str | None:
        """Why checkpoint `step` cannot be restored (missing files, unreadable metadata), or None
        when it looks intact. Raises ConfigError (a ValueError) when it is intact but holds other
        shapes than `like` or was written by another number of processes."""
        d = epath.Path(self.directory) / str(step)
        n, i = jax.process_count(), jax.process_index()
        need = ["_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", f"data/process_{i}-of-{n}.json"]
        missing = [f for f in need if not (d / f).exists()]
        others = sorted(p.name for p in (d / "data").glob("process_*-of-*.json")) if (d / "data").exists() else []
        if need[-1] in missing and others and not any(o.endswith(f"-of-{n}.json") for o in others):
            raise ConfigError(f"checkpoint step {step} in {self.directory} was saved by another number of processes "
                              f"({others[0]}, ...; now {n}): resume with the same number of hosts")
        if missing:
            return f"missing {', '.join(missing)}"
        try:
            meta = ocp.StandardCheckpointHandler().metadata(d / "state")
            saved = [(tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(getattr(meta, "item_metadata", meta))]
            json.loads((d / "data" / f"process_{i}-of-{n}.json").read_text())
        except Exception as e:
            return f"unreadable metadata: {type(e).__name__}: {_one_line(e)}"
        wanted = saved if like is None else [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(_state_dict(like))]
        if saved != wanted:
            diff = next((f"{a} vs {b}" for a, b in zip(saved, wanted) if a != b),
                        f"{len(saved)} vs {len(wanted)} arrays")
            raise ConfigError(f"checkpoint step {step} in {self.directory} does not match this config's train state "
                             f"(saved vs now: {diff}); run with the config it was saved with, or another workdir")
        return None

    def _restore(self, like: TrainState, step: int) -> tuple[TrainState, Any]:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _state_dict(like),
        )
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ProcessJsonRestore()),
        )
        s = out["state"]
        state = TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"], rng=s["rng"])
        return state, out["data"]

    def _move_aside(self, step: int, reason: str) -> str:
        """Renames a damaged step out of the manager's folder (so it never counts towards `keep`)."""
        root = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
        dest, k = os.path.join(root, str(step)), 1
        while fs.exists(dest):
            dest, k = os.path.join(root, f"{step}.{k}"), k + 1
        if jax.process_index() == 0:
            fs.makedirs(root, exist_ok=True)
            fs.rename(os.path.join(self.directory, str(step)), dest)
            older = [s for s in self.all_steps() if s < step]
            then = f"resuming from step {max(older)}" if older else "no older checkpoint: starting from step 0"
            print(f"[train] warning: checkpoint step {step} is damaged ({reason[:200]}); moved to {dest}; {then}",
                  file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        if self._saved:  # a Checkpointer that only reads never deletes
            self._rotate()
        self.manager.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _all_processes(ok: bool) -> bool:
    """`ok` on every process (the same answer everywhere, so all restore the same step)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def export_trainable(path: str | os.PathLike, trainable: Any, meta: Mapping[str, Any]) -> None:
    """Writes the stage's trained params as `{"unet": tree}` (process 0 writes; all must call)."""
    tree = parallel.fetch(trainable)
    bad = [k for k, v in flatten_dict(tree).items() if np.issubdtype(np.asarray(v).dtype, np.floating)
           and not np.isfinite(np.asarray(v, np.float32)).all()]
    if bad:
        raise TrainingError(f"refusing to export {os.fspath(path)}: {len(bad)} tensor(s) hold NaN/inf "
                            f"(e.g. {'/'.join(bad[0])}); lower optim.learning_rate and rerun", exit_code=3)
    if jax.process_index() == 0:
        fs.makedirs(os.path.dirname(fs.abspath(path)), exist_ok=True)
        params_io.save_params(path, {"unet": tree}, meta)

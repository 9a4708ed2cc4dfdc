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
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from animatediff_jax import parallel
from animatediff_jax.checkpoints import params_io
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
    """orbax `CheckpointManager`: saves every `every` steps (async), keeps the last `keep`.

    `save` returns at once when async (the device arrays are copied first, so the train state
    may be donated to the next step); call `wait` before reading the files, `close` at the end.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 1000, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = max(1, int(every))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep and keep > 0 else None,
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

    def save(self, step: int, state: TrainState, data_state: Any = None, config: Mapping | None = None,
             force: bool = False) -> bool:
        """Saves if `step` is a multiple of `every` (or `force`); returns whether a save started."""
        if not force and step % self.every:
            return False
        items = {"state": ocp.args.StandardSave(_state_dict(state)), "data": ProcessJsonSave(data_state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=str)))
        # The decision is ours (orbax's default policy would also save the first step).
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, Any] | None:
        """`(state, data_state)` of `step` (default: the latest), laid out like `like`; None if none saved.

        `like` supplies structure, dtypes and shardings (arrays or `ShapeDtypeStruct`s with shardings).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_trainable(path: str | os.PathLike, trainable: Any, meta: Mapping[str, Any]) -> None:
    """Writes the stage's trained params as `{"unet": tree}` (process 0 writes; all must call)."""
    tree = parallel.fetch(trainable)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        params_io.save_params(path, {"unet": tree}, meta)


def load_exported(path: str | os.PathLike) -> tuple[dict, dict]:
    """`(unet_tree, meta)` of a file written by `export_trainable` (or any `{"unet": ...}` params file)."""
    tree, meta = params_io.load_params(path)
    return tree.get("unet", tree), meta

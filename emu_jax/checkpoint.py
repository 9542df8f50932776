"""Checkpoints: one layout, written and read here for training, conversion, generation and export.

    <dir>/<step>/params      model parameters (sharded arrays)
                /opt_state   optimizer state (training runs)
                /ema         moving average of params (runs with train.ema_decay > 0)
                /meta        `metadata`: JSON (a run's step and skipped updates; a converted file's
                             record); named files beside it (a converted file's carried tensors)
                /data        the Grain iterator's state (one file per process)

A step directory appears only when all of it is written: Orbax finalises a training save only when
every item is written, and a conversion is staged elsewhere and renamed into place, so a run or a
conversion killed mid-write leaves nothing `latest_step` would pick. Restoring takes abstract
targets with shardings, so a checkpoint restores onto any mesh shape; targets may name only some
towers (partial, per-tower restore).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("params", "opt_state", "ema", "meta", "data")
META = "metadata"  # the JSON inside meta/
# Replica-parallel writes (each replica of a replicated array writes a slice of it) compile one
# slicing program per distinct shard shape on first save: ~0.1 s each on CPU, ~30 s for a tiny
# decoder's 470 small arrays. Only arrays whose per-replica slice is at least this large are split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def use_array_handler() -> None:
    """Registers Orbax's jax.Array handler with our replica-parallel threshold (idempotent)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
        override=True)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the run stops with the steps that were kept."""


def _cause(error: BaseException) -> str:
    """The line that says why a write failed (Orbax wraps the OS error in several layers)."""
    text = str(error)
    for marker in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded"):
        if marker in text:
            return marker
    return text.splitlines()[0][:300] if text else type(error).__name__


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restore_tree(abstract, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores onto the shardings and dtypes of `abstract` (ShapeDtypeStructs with shardings)."""
    return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=partial)


def barrier(name: str) -> None:
    """Every process reaches `name` before any goes on (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- a training run's state

class Checkpointer:
    """Saves and restores a train state (any struct with `params`, `opt_state`, `ema` fields and a
    `replace` method) with its data iterator and a JSON `meta`. `saved` picks the part of the
    parameters (and EMA) written, e.g. LoRA adapters alone; `restore` returns that part."""

    def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True, saved=lambda p: p):
        use_array_handler()
        self.saved = saved
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save` would write `step` unforced (its interval, the first step, a preemption
        the processes agreed on): the loop reads that step's results at once."""
        return self.manager.should_save(step)

    def preemption_at(self, step: int) -> bool:
        """Whether the processes of a multi-process run agreed to save `step` for a preemption (JAX's
        preemption service: after a notice to any of them, the step after the furthest one reached;
        every process must ask at every step, which `due` does)."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state, data_iterator, meta: dict, force: bool = False) -> bool:
        import grain  # only runs that stream data need it (inference restores params alone)
        items = dict(params=ocp.args.PyTreeSave(self.saved(state.params)),
                     opt_state=ocp.args.PyTreeSave(state.opt_state), meta=ocp.args.JsonSave(meta),
                     data=grain.checkpoint.CheckpointSave(data_iterator))
        if state.ema is not None:
            items["ema"] = ocp.args.PyTreeSave(self.saved(state.ema))
        with self._failed_writes():  # an earlier asynchronous save's failure surfaces here
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, target, data_iterator):
        """(state, meta): `target` (the state as ShapeDtypeStructs with shardings) with its params,
        opt_state and ema read from `step`; the data iterator is restored in place."""
        import grain
        items = dict(params=_restore_tree(self.saved(target.params)), opt_state=_restore_tree(target.opt_state),
                     meta=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(data_iterator))
        if target.ema is not None:
            items["ema"] = _restore_tree(self.saved(target.ema))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = target.replace(params=restored.params, opt_state=restored.opt_state, ema=restored.get("ema"))
        return state, restored.meta

    def wait(self) -> None:
        with self._failed_writes():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _failed_writes(self):
        """A save that failed (a full disk, a lost mount) -> one `CheckpointWriteError` naming the
        directory, the cause and the steps kept; the unfinished step's temporary directory is removed
        (it was never committed, so no reader would pick it, but it holds the space)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax re-raises its writer threads' errors in many types
            directory = str(self.manager.directory)
            for name in os.listdir(directory):
                if ".orbax-checkpoint-tmp" in name and jax.process_index() == 0:
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            self.manager.reload()
            kept = self.manager.all_steps()
            raise CheckpointWriteError(f"writing a checkpoint to {directory} failed: {_cause(e)}; the unfinished "
                                       f"step was removed; finished steps kept: {kept or 'none'}") from e

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- readers

def latest_step(directory: str) -> int | None:
    """The newest finished step of a checkpoint directory (FileNotFoundError if there is none)."""
    if not os.path.isdir(directory):  # checked first: Orbax's manager would create it
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS)
    step = manager.latest_step()
    manager.close()
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    return step


def restore_params(directory: str, abstract_params, step: int | None = None, item: str = "params"):
    """The `params` item (or `item`, e.g. "ema") of a checkpoint written by the trainer or the
    converter (latest step by default), placed with the shardings of `abstract_params`, a tree of
    ShapeDtypeStructs that may name only some towers (e.g. {"llm": ...}): only those are read."""
    step = latest_step(directory) if step is None else step
    if not os.path.isdir(os.path.join(os.path.abspath(directory), str(step), item)):
        raise FileNotFoundError(f"checkpoint {directory}/{step} has no {item!r} item")
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS)
    restored = manager.restore(step, args=ocp.args.Composite(**{item: _restore_tree(abstract_params, partial=True)}))
    manager.close()
    # A partial restore leaves what the checkpoint lacks abstract: a renamed or missing parameter.
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(restored[item])[0]
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise KeyError(f"checkpoint {directory}/{step}/{item} lacks {len(missing)} parameter(s) the model needs, "
                       f"e.g. {', '.join(missing[:3])} (a checkpoint of another model version or config?)")
    return restored[item]


def stored_shapes(directory: str, step: int | None = None, item: str = "params") -> dict:
    """The shapes of a checkpoint's parameters, nested as the parameters (nothing is read but metadata)."""
    step = latest_step(directory) if step is None else step
    path = os.path.join(os.path.abspath(directory), str(step), item)
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree, is_leaf=lambda x: hasattr(x, "shape"))


def meta_file(directory: str, name: str = META, step: int | None = None) -> str:
    """The path of a file in the meta item of `step` (latest by default); it may not exist."""
    step = latest_step(directory) if step is None else step
    return os.path.join(os.path.abspath(directory), str(step), "meta", name)


def read_meta(directory: str, step: int | None = None) -> dict:
    """The meta JSON of `step` (latest by default); {} when the step has none."""
    path = meta_file(directory, META, step)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class ParamReader:
    """Reads one parameter at a time as a host array (the last one is kept: a stacked leaf serves
    many keys), so memory stays near the largest parameter."""

    def __init__(self, directory: str, step: int | None = None):
        self.step = latest_step(directory) if step is None else step
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS)
        self._path, self._value = None, None

    def get(self, path: tuple[str, ...]) -> np.ndarray:
        if path != self._path:
            args = ocp.RestoreArgs(restore_type=np.ndarray)
            for part in reversed(path):
                args = {part: args}
            structure = np.zeros((0,), np.float32)  # the tree's structure only
            for part in reversed(path):
                structure = {part: structure}
            node = self.manager.restore(self.step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                item=structure, restore_args=args, partial_restore=True))).params
            for part in path:
                node = node[part]
            self._path, self._value = path, np.asarray(node)
        return self._value

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- a converted checkpoint

class StagedParams:
    """Writes a params-only step (a conversion) piece by piece: each `append` adds a subtree of
    placed arrays (asynchronously; one write in flight while the caller reads the next piece), and
    `commit` adds the meta item and renames the staged step into `<directory>/<step>` at once.
    Every process appends its own shards; process 0 commits. An interrupted conversion leaves only
    the staging directory, which the next one clears."""

    def __init__(self, directory: str, step: int = 0, compress: bool = False):
        from orbax.checkpoint.experimental import v1 as ocp_v1
        self._v1 = ocp_v1
        self.final = os.path.join(os.path.abspath(directory), str(step))
        self.staging = os.path.join(os.path.dirname(os.path.abspath(directory)), ".convert-staging")
        self.step_dir = os.path.join(self.staging, str(step))
        if jax.process_index() == 0 and os.path.exists(self.staging):
            shutil.rmtree(self.staging)  # an earlier conversion that was interrupted
        barrier("staging cleared")
        self._context = ocp_v1.Context()
        self._context.array.saving.use_compression = compress
        self._writing = None

    def append(self, tree, wait: bool = False) -> None:
        self.wait()
        with self._context:
            if wait:
                self._v1.partial.save(self.step_dir, tree)
            else:
                self._writing = self._v1.partial.save_async(self.step_dir, tree)

    def wait(self) -> None:
        """No write is still running afterwards (also call it before raising a reader's error)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def commit(self, meta: dict, files=None) -> str:
        """Finalises the params, writes `meta` and `files` ({name: write(path)}) into the meta item,
        renames the step into place; returns the checkpoint directory."""
        self.wait()
        with self._context:
            self._v1.partial.finalize(self.step_dir)
        if jax.process_index() == 0:
            os.rename(os.path.join(self.step_dir, "state"), os.path.join(self.step_dir, "params"))
            os.makedirs(os.path.join(self.step_dir, "meta"))
            with open(os.path.join(self.step_dir, "meta", META), "w") as f:
                json.dump(meta, f)
            for name, write in (files or {}).items():
                write(os.path.join(self.step_dir, "meta", name))
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            os.rename(self.step_dir, self.final)
            shutil.rmtree(self.staging)
        barrier("checkpoint committed")
        return os.path.dirname(self.final)

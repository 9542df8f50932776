"""Orbax checkpoints of a training run: one item per component group.

    <workdir>/checkpoints/<step>/params      model parameters (sharded arrays)
                                /opt_state   optimizer state
                                /ema         moving average of params (runs with train.ema_decay > 0)
                                /meta        JSON: step, skipped updates, config
                                /data        the Grain iterator's state (one file per process)

Saves are asynchronous; Orbax finalises a step directory only when every item is written, so a
run killed mid-save leaves nothing that `latest_step` would pick. Restoring takes abstract
targets with shardings, so a checkpoint restores onto any mesh shape.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "ema", "meta", "data")
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


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
        use_array_handler()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, meta: dict, force: bool = False) -> bool:
        import grain  # only runs that stream data need it (inference restores params alone)
        items = dict(params=ocp.args.PyTreeSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
                     meta=ocp.args.JsonSave(meta), data=grain.checkpoint.CheckpointSave(data_iterator))
        if state.ema is not None:
            items["ema"] = ocp.args.PyTreeSave(state.ema)
        with self._failed_writes():  # an earlier asynchronous save's failure surfaces here
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator, abstract_ema=None):
        """(params, opt_state, ema or None, meta); the data iterator is restored in place."""
        import grain
        items = dict(params=_restore_tree(abstract_params), opt_state=_restore_tree(abstract_opt_state),
                     meta=ocp.args.JsonRestore(), data=grain.checkpoint.CheckpointRestore(data_iterator))
        if abstract_ema is not None:
            items["ema"] = _restore_tree(abstract_ema)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored.params, restored.opt_state, restored.get("ema"), restored.meta

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


def restore_params(directory: str, abstract_params, step: int | None = None, item: str = "params"):
    """The `params` item (or `item`, e.g. "ema") of a checkpoint written by the trainer or the
    converter (latest step by default), placed with the shardings of `abstract_params`, a tree of
    ShapeDtypeStructs that may name only some towers (e.g. {"llm": ...}): only those are read."""
    if not os.path.isdir(directory):  # checked first: Orbax's manager would create it
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if not os.path.isdir(os.path.join(os.path.abspath(directory), str(step), item)):
        raise FileNotFoundError(f"checkpoint {directory}/{step} has no {item!r} item")
    restored = manager.restore(step, args=ocp.args.Composite(**{item: _restore_tree(abstract_params, partial=True)}))
    manager.close()
    # A partial restore leaves what the checkpoint lacks abstract: a renamed or missing parameter.
    missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(restored[item])[0]
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        raise KeyError(f"checkpoint {directory}/{step}/{item} lacks {len(missing)} parameter(s) the model needs, "
                       f"e.g. {', '.join(missing[:3])} (a checkpoint of another model version or config?)")
    return restored[item]

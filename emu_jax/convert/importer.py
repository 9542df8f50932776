"""Released PyTorch weights -> an Orbax checkpoint the trainer and generator load directly.

    <out>/checkpoints/0/params   our parameter tree (only the towers the layout covers), sharded
                        /meta     JSON: the layout, the source, every converted key and its dtype;
                                  carried.safetensors: keys the official class saves and our
                                  model never reads (Emu1's EVA head, Emu2-Gen's safety checker)
LoRA-wrapped weights (Emu-I) are merged with their adapters on the way (W + alpha / r * B @ A).
An `out` whose checkpoints/ already holds a step is refused: step 0 beside trained steps would be
silently ignored by a resuming trainer.

One parameter at a time: its source tensor(s) are read, transformed (transpose,
reshape, stack the layers of scanned towers, cast), placed on their shards over the mesh, and
handed to Orbax's partial save, which appends it to a staging checkpoint; nothing else is held.
Multi-process: every process runs the same loop, places only its addressable shards and writes
them (tests: two processes on loopback). The staging directory becomes `checkpoints/0` by one rename after the last write, so an
interrupted conversion leaves nothing `latest_step` would pick.
"""
from __future__ import annotations

import concurrent.futures
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from emu_jax import checkpoint
from emu_jax.convert import layouts, plan as plan_lib
from emu_jax.convert.tensors import TensorSource, open_source, write_safetensors

STEP = 0
CARRIED = "carried.safetensors"  # beside meta/metadata: keys the official class has and our model does not use
FLUSH_BYTES = 256 << 20


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _transform(arrays, leaf, shape, axes, dtype):
    converted = [layouts.to_ours(a, leaf, shape, axes).astype(dtype) for a in arrays]
    return jnp.stack(converted) if len(converted) > 1 else converted[0]


def params_from_plan(plan: plan_lib.Plan, source: TensorSource, path: plan_lib.Path, dtype=None) -> np.ndarray:
    """One of our parameters as a host array, read from its source tensor(s)."""
    return _converted(plan, path, _read(plan, source, path), dtype)


def _read(plan: plan_lib.Plan, source: TensorSource, path: plan_lib.Path) -> list[np.ndarray]:
    """The source tensors of one of our parameters, layer by layer."""
    layers = plan.assignments[path]
    return [plan.read(source, layers[i]) for i in range(plan.targets[path].num_layers)]


def _converted(plan: plan_lib.Plan, path: plan_lib.Path, arrays: list[np.ndarray], dtype=None) -> np.ndarray:
    """Transposes, casts and the stacking of a scanned tower's layers run as one XLA call on the
    host's CPU device (4x numpy's strided transpose here: 2 GiB of LLaMA kernels in 1.0 s, not 4.2 s),
    reading the source arrays in place (aligned reads are adopted, not copied) and writing the result
    once; a parameter the layout only reshapes is not copied at all."""
    t = plan.targets[path]
    dtype = np.dtype(dtype or t.dtype)
    if not t.stacked and arrays[0].dtype == dtype and not layouts.moves_data(path[-1]):
        return layouts.to_ours(arrays[0], path[-1], t.layer_shape, t.layer_axes)
    cpu = jax.local_devices(backend="cpu")[0]
    return np.asarray(_transform(jax.device_put(arrays, cpu), path[-1], t.layer_shape, t.layer_axes, dtype))


def to_params(source: TensorSource, layout_name: str, config, strict: bool = True,
              lora_alpha: float | None = None) -> dict:
    """The whole converted tree as host numpy arrays (no mesh, no checkpoint): for tests, parity
    checks and small towers."""
    layout = layouts.get_layout(layout_name)
    plan = plan_lib.make_plan(source, layout, plan_lib.targets(config, layout), strict, lora_alpha)
    return plan_lib.nested({path: params_from_plan(plan, source, path) for path in plan.targets})


def _order(plan: plan_lib.Plan, source: TensorSource) -> list[plan_lib.Path]:
    """Parameters in the order their first source tensor appears (sequential reads of each file)."""
    position = {key: i for i, key in enumerate(source.keys())}
    return sorted(plan.assignments, key=lambda p: min(position[k] for k in plan.assignments[p].values()))


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _refuse_existing_steps(out_dir: str) -> None:
    """A converted checkpoint is step 0: beside trained steps the trainer would resume from the
    latest of those and never see it, so an `out_dir` holding any step is refused."""
    checkpoints = os.path.join(os.path.abspath(out_dir), "checkpoints")
    steps = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
    if steps:
        raise FileExistsError(f"{out_dir}: checkpoints/ already holds {', '.join(steps[:5])}"
                              f"{' ...' if len(steps) > 5 else ''}; convert into a new --out directory")


def import_checkpoint(source: TensorSource, layout_name: str, config, out_dir: str, *, mesh=None,
                      strict: bool = True, lora_alpha: float | None = None, flush_bytes: int = FLUSH_BYTES,
                      compress: bool = False, progress: bool = True) -> dict:
    """Converts `source` into `<out_dir>/checkpoints/0`; returns a summary (tensors, bytes, dropped).

    Each group of about `flush_bytes` is written asynchronously while the next is read, so peak
    memory is about two groups plus the largest parameter. `compress` turns on Orbax's zstd
    (released weights barely compress, and it costs more time than the write)."""
    from tqdm import tqdm
    layout = layouts.get_layout(layout_name)
    plan = plan_lib.make_plan(source, layout, plan_lib.targets(config, layout, mesh), strict, lora_alpha)
    _refuse_existing_steps(out_dir)
    staged = checkpoint.StagedParams(os.path.join(os.path.abspath(out_dir), "checkpoints"), STEP, compress)
    total = sum(source.nbytes(k) for k in plan.source_keys())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert",
               disable=not (progress and jax.process_index() == 0))
    _write(plan, source, _order(plan, source), staged, flush_bytes, bar)
    bar.close()
    converted = plan.source_keys()
    meta = {"converted_from": {"layout": layout.name, "source": source.description,
                               "keys": [k for k in source.keys() if k in set(converted)],
                               "dtypes": {k: source.dtypes[k] for k in converted}, "dropped": plan.dropped,
                               "carried": plan.carried, "lora_alpha": plan.lora_alpha if plan.adapters else None}}
    files = {CARRIED: partial(_write_carried, plan, source)} if plan.carried else {}
    directory = staged.commit(meta, files)
    return {"tensors": len(converted), "bytes": total, "dropped": plan.dropped, "carried": plan.carried,
            "checkpoint": directory}


def _write_carried(plan: plan_lib.Plan, source: TensorSource, path: str) -> None:
    """The carried keys, verbatim (dtype and bytes), for export to write back."""
    write_safetensors(path, [(k, source.shapes[k], source.dtypes[k], lambda k=k: source.read(k)) for k in plan.carried])


def carried_source(checkpoint_dir: str) -> TensorSource | None:
    """The carried keys of a converted checkpoint's latest step (None when it carries none)."""
    path = checkpoint.meta_file(checkpoint_dir, CARRIED)
    return open_source(path) if os.path.exists(path) else None


def _write(plan, source, order, staged: checkpoint.StagedParams, flush_bytes, bar) -> None:
    """Reads, converts, places and appends parameters group by group: the next parameter's read
    overlaps this one's conversion, and a group's write overlaps the reads of the next."""
    pending, pending_bytes, done = {}, 0, 0
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="convert-read")
    try:
        reading = reader.submit(_read, plan, source, order[0]) if order else None
        for i, path in enumerate(order):
            arrays = reading.result()
            if i + 1 < len(order):
                reading = reader.submit(_read, plan, source, order[i + 1])
            host = _converted(plan, path, arrays)
            del arrays
            pending[path] = _place(host, plan.targets[path].sharding)
            pending_bytes += host.nbytes
            del host
            done += len(plan.assignments[path])
            bar.update(sum(source.nbytes(k) for k in plan.assignments[path].values()))
            bar.set_postfix(tensors=f"{done}/{len(plan.source_keys())}")
            if pending_bytes >= flush_bytes:
                staged.append(plan_lib.nested(pending))
                pending, pending_bytes = {}, 0
    finally:  # also on a failed read: no read or write may still be running when the error reaches the caller
        reader.shutdown(cancel_futures=True)
        staged.wait()
    if pending:
        staged.append(plan_lib.nested(pending), wait=True)


def recorded_source(checkpoint_dir: str) -> dict | None:
    """The `converted_from` record of a converted checkpoint (None for trained ones)."""
    return checkpoint.read_meta(checkpoint_dir).get("converted_from")

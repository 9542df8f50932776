"""The device mesh, multi-process start-up, and the shardings derived from logical axis names.

Mesh axes are `data`, `fsdp` and `tensor` (config.mesh; one size may be -1 to take the rest of
the devices). Batches shard over data x fsdp; parameters follow the config's logical-axis rules.
"""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A mesh or batch the devices cannot take."""


def maybe_initialize_distributed(config) -> None:
    """Joins a multi-process run when the config or the environment asks for one.

    config.distributed: coordinator ("host:port"), num_processes, process_id; or `auto`, or (left
    empty) a known cluster environment (JAX_COORDINATOR_ADDRESS, SLURM, TPU worker hostnames): then
    JAX's own cluster detection fills in the coordinator and this process's place. A process whose
    peer stops answering for `heartbeat_timeout_seconds` ends with JAX's error naming the dead task."""
    d = config.get("distributed")
    heartbeat = {"heartbeat_timeout_seconds": (d or {}).get("heartbeat_timeout_seconds", 100)}
    if d is not None and d.coordinator:
        if d.get("cpu_collectives"):
            jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
        jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id,
                                   **heartbeat)
    elif (d is not None and d.get("auto")) or any(
            k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize(**heartbeat)


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
    """Axis sizes with at most one -1 filled in; a clear error when they do not match the devices."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {device_count} devices: "
                             f"{device_count} is not a multiple of {known}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {device_count} are available")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None, allow_subset: bool = False) -> Mesh:
    """The mesh over `devices` (all by default). `allow_subset` (inference) takes the first
    devices a mesh with no -1 axis needs instead of insisting it use them all."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if allow_subset and -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[:math.prod(sizes)]
    shape = mesh_shape(mesh_config, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):  # topologies the helper does not know
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, accum_steps: int = 1) -> None:
    """Every micro-batch must split evenly over the batch axes."""
    divisor = batch_divisor(mesh)
    if global_batch % accum_steps or (global_batch // accum_steps) % divisor:
        raise MeshError(f"global batch {global_batch} with {accum_steps} accumulation step(s) gives micro-batches "
                         f"of {global_batch / accum_steps:g} rows, which do not divide over the mesh's batch axes "
                         f"(data x fsdp = {divisor})")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from jax.eval_shape)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def strip_boxes(boxed_tree):
    """The values of a tree of `nn.LogicallyPartitioned` leaves, without sharding constraints
    (`nn.unbox` constrains, which abstract values outside jit cannot take)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, boxed_tree, is_leaf=is_box)


def to_host(tree):
    """Device arrays -> numpy arrays holding the whole value, on every process. A process reads only
    its own devices' shards, so an array sharded over other processes' devices is all-gathered first:
    every process of a multi-process run must call this at the same point, as any collective."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


def abstract_model(model, inputs, mesh: Mesh, rules):
    """(abstract params as ShapeDtypeStructs, their NamedShardings) without allocating anything;
    `inputs` are the model's example inputs (ShapeDtypeStructs)."""
    boxed = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw), inputs)["params"]
    return strip_boxes(boxed), logical_shardings(boxed, mesh, rules)

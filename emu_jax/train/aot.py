"""Ahead-of-time compilation of the real train step for a TPU slice (or this machine's devices):
does the config fit in HBM, and how fast would it run?

The step is the trainer's own (`trainer.build` -> `trainer.jit_train_step`), lowered with abstract
state and batch (ShapeDtypeStructs carrying their shardings) and compiled by the TPU compiler
against abstract devices from libtpu. Reported per device: argument, output, temporary and code
bytes from `memory_analysis()`; the total (outputs aliased to donated arguments counted once)
against the chip's HBM.

Speed comes from the compiler's cost model. `cost_analysis()` counts a scanned layer's body once,
so FLOPs and estimated seconds are extrapolated: the step is compiled again with each scanned tower
unrolled at 2 layers, and the difference (one layer's cost) is added for the remaining layers. MFU = the step's analytic FLOPs (`emu_jax.train.flops`) / (estimated seconds x
peak); the estimate is the compiler's optimistic one (`optimal_seconds`), so real MFU is lower.
"""
from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from emu_jax import config_lib
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.parallel import topology as topology_lib
from emu_jax.train import trainer
from emu_jax.train.tasks import make_task

OUT_OF_MEMORY_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "exceeds the memory")


@dataclasses.dataclass
class Report:
    target: str  # the slice name, or "cpu"
    devices: int
    mesh: dict
    global_batch: int
    grad_accum_steps: int
    remat: dict
    fits: bool | None  # None: no HBM size known (CPU)
    hbm_bytes: int | None
    memory: dict = dataclasses.field(default_factory=dict)  # per device: arguments/outputs/aliased/temporaries/code
    error: str = ""  # the compiler's out-of-memory message (or the sharding error), when it refused
    unshardable: bool = False  # a parameter dimension does not divide over its mesh axes
    compiler_flops: float = 0.0  # per device, as cost_analysis reports it (scanned bodies once)
    compiler_seconds: float = 0.0  # the compiler's estimated step time, likewise
    estimated_flops: float = 0.0  # per device, extrapolated over the scanned layers
    estimated_seconds: float = 0.0
    analytic_flops: float = 0.0  # per device
    tokens_per_step: int = 0
    peak_flops: float = 0.0  # per device
    compile_seconds: float = 0.0
    state_bytes: int = 0  # per device: parameters and optimizer state as sharded (a lower bound of the step's memory)

    @property
    def total_bytes(self) -> int:
        m = self.memory
        return m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"] if m else 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.estimated_seconds if self.estimated_seconds > 0 else 0.0

    @property
    def mfu(self) -> float:
        return self.analytic_flops / (self.estimated_seconds * self.peak_flops) if self.estimated_seconds > 0 else 0.0


def target_devices(target: str) -> tuple[list, topology_lib.Chip | None]:
    """(devices, chip) for a TPU slice name, or this process's devices for "cpu"/"local"."""
    if target in ("cpu", "local"):
        return jax.devices(), None
    tpu_slice = topology_lib.parse(target)
    return topology_lib.devices(tpu_slice), tpu_slice.chip


def lower_train_step(config, devices):
    """(lowered step, Setup, mesh): the trainer's train step lowered for `devices` with abstract
    state and batch."""
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    mesh_lib.check_batch(config.data.global_batch_size, mesh, config.train.grad_accum_steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        setup = trainer.build(config, mesh)
        step = trainer.jit_train_step(config, setup)
        batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.batch_sharding)
                 for k, s in setup.task.batch_spec().items()}
        return step.lower(trainer.abstract_state(setup), batch), setup, mesh


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}


def compiled_cost(compiled) -> dict:
    """Per-device FLOPs and the compiler's estimated seconds, as cost_analysis() reports them."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "seconds": float(cost.get("optimal_seconds", 0.0))}


def scannable_layers(config) -> dict:
    """{tower: its layer-count key} of the trained model family's towers that may be scanned."""
    return make_task(config).family.scanned_layers


def _scanned(config) -> dict:
    """{tower: layer count} of the towers the config scans."""
    return {t: config.model[t][key] for t, key in scannable_layers(config).items()
            if t in config.model and config.model[t].get("scan_layers")}


def extrapolated_cost(config, devices, scanned_cost: dict) -> dict:
    """Per-device FLOPs and seconds of the whole step. `scanned_cost` is the compiled step's own
    (each scanned tower's body counted once, i.e. one layer); per scanned tower, a variant with that
    tower unrolled at two layers costs one layer more, and (layers - 1) such layers are added.
    Gradient accumulation is a scan over the micro-batches, counted once too: k micro-batches cost k
    times one (the optimizer update, outside that loop, then counts k times, as the search's probes
    count it: an overestimate by its elementwise work). Seconds are 0 (unknown) where the compiler's
    cost model gave a negative time for any of the programs."""
    total = dict(scanned_cost)
    known = scanned_cost["seconds"] >= 0  # the TPU cost model returns a negative time for some programs
    for tower, depth in _scanned(config).items():
        logging.info("compiling %s unrolled at 2 layers (cost of one layer)", tower)
        two_layers = config_lib.with_overrides(config, {f"model.{tower}.scan_layers": False,
                                                        f"model.{tower}.{scannable_layers(config)[tower]}": 2})
        lowered, _, _ = lower_train_step(two_layers, devices)
        layer = {k: v - scanned_cost[k] for k, v in compiled_cost(lowered.compile()).items()}
        for key in total:
            total[key] += (depth - 1) * layer[key]
        known &= layer["seconds"] + scanned_cost["seconds"] >= 0
    total = {key: value * config.train.grad_accum_steps for key, value in total.items()}
    if not (known and total["seconds"] > 0):
        logging.warning("the compiler's cost model gave a negative step time for the step or one of its 2-layer "
                        "variants: no step-time estimate")
        total["seconds"] = 0.0
    return total


def state_bytes_per_device(state) -> int:
    """Bytes of the largest per-device share of an abstract, sharded train state."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        size = int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + size
    return max(per_device.values(), default=0)


def compile_report(config, target: str, *, extrapolate: bool = True) -> Report:
    """Compiles the train step of `config` for `target` and reports memory, fit and speed; a step
    the compiler refuses for lack of memory, or whose parameters do not split over the mesh (a
    dimension the FSDP axis does not divide), gives fits=False and the message instead of raising."""
    devices, chip = target_devices(target)
    tc = config.train
    report = Report(target=target, devices=len(devices), mesh={}, global_batch=config.data.global_batch_size,
                    grad_accum_steps=tc.grad_accum_steps,
                    remat={t: config.model[t].get("remat", "none") for t in scannable_layers(config) if t in config.model},
                    fits=None, hbm_bytes=chip.hbm_bytes if chip else None,
                    peak_flops=chip.peak_bf16_flops if chip else 0.0)
    start = time.perf_counter()
    logging.info("compiling the train step for %s (%d devices)", target, len(devices))
    try:
        lowered, setup, mesh = lower_train_step(config, devices)
    except ValueError as e:  # jax's IndivisibleError (not public): a dimension the mesh axes do not divide
        if type(e).__name__ != "IndivisibleError":
            raise
        report.fits, report.unshardable = False, True
        report.error = "the parameters do not split over this mesh: " + str(e).strip().splitlines()[0][:500]
        report.mesh = dict(zip(mesh_lib.MESH_AXES, mesh_lib.mesh_shape(config.mesh, len(devices))))
        return report
    report.mesh = dict(mesh.shape)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        report.state_bytes = state_bytes_per_device(trainer.abstract_state(setup))
    if chip and report.state_bytes > chip.hbm_bytes:  # no compile can make it fit: skip minutes of compiling
        report.fits = False
        report.error = (f"the parameters and optimizer state alone take {report.state_bytes / topology_lib.GIB:.2f} "
                        f"GiB per device, over the chip's {chip.hbm_bytes / topology_lib.GIB:.2f} GiB")
        report.compile_seconds = time.perf_counter() - start
        return report
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; only out-of-memory is a finding, anything else is a bug
        if not any(marker in str(e) for marker in OUT_OF_MEMORY_MARKERS):
            raise
        report.fits, report.error = False, "the compiler ran out of memory: " + str(e).strip().splitlines()[0][:500]
        report.compile_seconds = time.perf_counter() - start
        return report
    report.compile_seconds = time.perf_counter() - start
    report.memory = _memory(compiled)
    if chip:
        report.fits = report.total_bytes <= chip.hbm_bytes
    cost = compiled_cost(compiled)
    report.compiler_flops, report.compiler_seconds = cost["flops"], cost["seconds"]
    report.analytic_flops = setup.task.step_flops(setup.abstract_params, setup.optimizer.frozen) / len(devices)
    report.tokens_per_step = config.data.global_batch_size * config.data.get("seq_len", 0)
    if extrapolate:
        estimate = extrapolated_cost(config, devices, cost)
        report.estimated_flops, report.estimated_seconds = estimate["flops"], estimate["seconds"]
    return report


def suggestions(config, report: Report) -> list[tuple[str, dict]]:
    """What would lower per-device memory, most effective first, as (reason, overrides) pairs:
    shard parameters and optimizer state over every device, rematerialise whole layers, halve the
    micro-batch (gradient accumulation keeps the global batch). A mesh the parameters do not divide
    over first gets half the FSDP axis (twice the data axis)."""
    out = []
    mesh = config.mesh
    if report.unshardable and report.mesh.get("fsdp", 1) > 1:
        data = report.mesh["data"] * 2
        return [(f"halve the FSDP axis ({report.mesh['fsdp']} does not divide every sharded dimension)",
                 {"mesh.data": data, "mesh.fsdp": -1})]
    if not (mesh.fsdp == -1 and mesh.data == 1 and mesh.tensor == 1) and mesh.fsdp != report.devices:
        out.append(("shard parameters and optimizer state over all devices (FSDP)",
                    {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}))
    if report.hbm_bytes and report.state_bytes > report.hbm_bytes:
        return out  # remat and micro-batches shrink activations, not the parameters and optimizer state
    remat = {f"model.{t}.remat": "full" for t, policy in report.remat.items() if policy != "full"}
    if remat:
        out.append(("rematerialise whole layers (keeps only layer inputs for the backward pass)", remat))
    micro = config.data.global_batch_size // config.train.grad_accum_steps
    batch_devices = report.mesh.get("data", 1) * report.mesh.get("fsdp", 1) if report.mesh else report.devices
    if micro // 2 >= batch_devices and micro % 2 == 0:
        out.append((f"halve the per-device micro-batch ({micro // batch_devices} -> {micro // 2 // batch_devices} rows)",
                    {"train.grad_accum_steps": config.train.grad_accum_steps * 2}))
    return out


def fit(config, target: str, *, extrapolate: bool = True) -> tuple[Report, dict]:
    """Compiles as given, then applies `suggestions` one at a time (cumulatively) until the step
    fits; returns the last report and the overrides that produced it."""
    applied: dict = {}
    tried = {()}
    report = compile_report(config, target, extrapolate=extrapolate)
    while report.fits is False:
        options = [dict(applied, **overrides) for _, overrides in
                   suggestions(config_lib.with_overrides(config, applied), report)]
        options = [o for o in options if tuple(sorted(o.items())) not in tried]  # never go back
        if not options:
            break
        applied = options[0]
        tried.add(tuple(sorted(applied.items())))
        report = compile_report(config_lib.with_overrides(config, applied), target, extrapolate=extrapolate)
    return report, applied


def format_report(report: Report) -> str:
    gib = lambda b: f"{b / topology_lib.GIB:.2f} GiB"  # noqa: E731
    lines = [f"target {report.target}: {report.devices} devices, mesh {report.mesh}, global batch "
             f"{report.global_batch} ({report.grad_accum_steps} accumulation step(s)), remat {report.remat}",
             f"compile: {report.compile_seconds:.1f} s"]
    if report.error:
        lines.append(f"does NOT fit: {report.error}")
        return "\n".join(lines)
    m = report.memory
    lines.append(f"per-device memory: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])} "
                 f"(aliased to donated arguments {gib(m['aliased'])}), temporaries {gib(m['temporaries'])}, "
                 f"code {gib(m['code'])}; total {gib(report.total_bytes)}"
                 + (f" of {gib(report.hbm_bytes)} HBM ({report.total_bytes / report.hbm_bytes:.0%})"
                    if report.hbm_bytes else ""))
    if report.fits is not None:
        lines.append("fits" if report.fits else "does NOT fit in HBM")
    lines.append(f"FLOPs per device: compiler {report.compiler_flops:.3e} (scanned layers counted once), "
                 f"extrapolated {report.estimated_flops:.3e}, analytic {report.analytic_flops:.3e}")
    if report.compiler_seconds < 0:  # configs/small.py on v5e-4: -532 s
        lines.append(f"no step-time estimate: the compiler's cost model returned a negative step time "
                     f"({report.compiler_seconds:.1f} s) for this program")
    elif report.estimated_flops and report.estimated_seconds <= 0:  # extrapolated, from a negative 2-layer time
        lines.append("no step-time estimate: the compiler's cost model returned a negative step time for a "
                     "2-layer variant of this program")
    elif report.estimated_seconds > 0:
        lines.append(f"estimated step time {report.estimated_seconds * 1e3:.1f} ms (compiler cost model) -> "
                     f"{report.tokens_per_second:,.0f} tokens/s"
                     + (f", MFU estimate {report.mfu:.1%}" if report.peak_flops else ""))
    return "\n".join(lines)

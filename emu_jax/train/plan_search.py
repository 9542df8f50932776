"""The fastest train-step plan that fits a slice: remat policy per tower, data x FSDP x tensor
mesh, micro-batch (gradient accumulation) and scanned or unrolled layers, searched ahead of time.

Compiling the whole 37B step for 64 chips takes minutes on a laptop, so the search spends its
compiles where they decide something:

1. Enumerate the plans of the search space (a tower whose parameters are all frozen keeps "none":
   XLA drops its backward pass, so it saves nothing for one), and drop, before any compile, those
   whose sharded parameters and optimizer state (computed from the abstract state, exact) leave
   less than the safety margin of HBM.
2. Estimate each remaining plan from small *probes*: the step compiled unrolled at one and two
   layers per tower, with the micro-batch as the global batch. The compiler's cost and memory are
   linear in depth (cost = outer + sum over towers of depth x per-layer cost), so the probes give
   the outer part and each tower's per-layer cost under each remat policy: a mesh and micro-batch
   need 1 + towers + (policies - 1) x towers probes, not one compile per plan. A step of k
   micro-batches costs k probe steps (its optimizer update is then counted k times, an
   overestimate). The probes' memory is reported beside each plan but drops none: unrolled probes
   misjudge a scanned step's memory in both directions (emu2_37b on v5p-128: full remat estimated
   at 119.7 GiB, compiled at 37.8; ViT dots_no_batch plans estimated under 85 GiB ran out of 95),
   so a filter on it dropped every plan that fits.
3. Rank by estimated MFU: the step's analytic model FLOPs (recomputation never counts as useful
   work) / (estimated seconds x chip peak); compile the real step of the plans in that order until
   `verify` of them fit with the margin (a plan that runs out of memory fails its compile in
   seconds; `max_compiles` bounds the search). Their compiled memory is the verdict. Should none
   fit, each mesh group's heaviest plan (full remat: what `--fit` would find) is compiled last, so
   the search never reports nothing where the first-fit plan fits.

Every compile's result is cached on disk by a hash of the compiled config, the target, the jax and
libtpu versions and this package's source (any edit to it starts the cache afresh), so a re-run, or
a search that shares probes with an earlier one, compiles only what is new.
Compiles run in `jobs` parallel processes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import pathlib
import time

import flax.linen as nn
import jax
from absl import logging

from emu_jax import config_lib
from emu_jax.models import layers
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.parallel import topology as topology_lib
from emu_jax.train import aot, trainer

NOT_COMPILED = "not compiled (a faster plan fit)"
DEFAULT_POLICIES = ("none", "dots_no_batch", "save_attention", "save_qkv", "full")
SAVES_MOST_FIRST = list(layers.REMAT_POLICIES)  # remat policies, from the one saving most to the one saving least


@dataclasses.dataclass(frozen=True)
class Space:
    """The plans searched: every combination of these (policies per tower independently)."""
    policies: tuple[str, ...] = DEFAULT_POLICIES
    tensor: tuple[int, ...] = (1, 2, 4)
    data: tuple[int, ...] = (1,)
    accum: tuple[int, ...] = (1, 2, 4)
    scan: tuple[bool, ...] = (True,)


@dataclasses.dataclass(frozen=True)
class Plan:
    data: int
    fsdp: int
    tensor: int
    accum: int
    remat: tuple[tuple[str, str], ...]  # (tower, policy)
    scan: bool = True

    def overrides(self) -> dict:
        out = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor,
               "train.grad_accum_steps": self.accum}
        for tower, policy in self.remat:
            out[f"model.{tower}.remat"] = policy
            out[f"model.{tower}.scan_layers"] = self.scan
        return out

    def describe(self) -> str:
        remat = ", ".join(f"{t} {p}" for t, p in self.remat)
        return (f"mesh {self.data}x{self.fsdp}x{self.tensor}, {remat}, "
                f"{self.accum} micro-batch(es), {'scanned' if self.scan else 'unrolled'}")


@dataclasses.dataclass
class Candidate:
    plan: Plan
    state_bytes: int = 0  # per device, exact (abstract sharded state)
    estimated_bytes: float = 0.0  # per device, from the probes
    estimated_seconds: float = 0.0
    mfu: float = 0.0
    verdict: str = ""  # why it was dropped, or what its own compile said
    compiled: dict | None = None  # the verifying compile's report (memory, fits)

    def as_dict(self) -> dict:
        return dict(plan=dataclasses.asdict(self.plan), overrides=self.plan.overrides(), describe=self.plan.describe(),
                    state_bytes=self.state_bytes, estimated_bytes=self.estimated_bytes,
                    estimated_seconds=self.estimated_seconds, mfu=self.mfu, verdict=self.verdict,
                    compiled=self.compiled)


# ----------------------------------------------------------------------------- compiles (cached, in processes)

@functools.cache
def _code_version() -> str:
    """jax, libtpu and this package's source: a cached compile is stale when any of them changes."""
    digest = hashlib.sha256(jax.__version__.encode())
    try:
        digest.update(importlib.metadata.version("libtpu").encode())
    except importlib.metadata.PackageNotFoundError:  # CPU targets only
        pass
    for path in sorted(pathlib.Path(__file__).resolve().parents[1].rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _key(config, target: str) -> str:
    blob = json.dumps([config.to_dict(), target, _code_version()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _compile(config, target: str) -> dict:
    """{bytes, flops, seconds, fits, memory} of the step as compiled (per device; the compiler's
    cost counts a scanned body once, which is why probes are unrolled); out of memory or
    unshardable: {"error": ...}."""
    report = aot.compile_report(config, target, extrapolate=False)
    out = {"error": report.error, "compile_seconds": report.compile_seconds}
    if report.memory:
        out.update(bytes=report.total_bytes, flops=report.compiler_flops, seconds=report.compiler_seconds,
                   fits=report.fits, memory=report.memory)
    return out


def _cached_compile(args) -> dict:
    config, target, cache_dir = args
    path = os.path.join(cache_dir, f"{_key(config, target)}.json") if cache_dir else ""
    if path and os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    result = _compile(config, target)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
    return dict(result, cached=False)


def compile_all(jobs: list[tuple], workers: int) -> list[dict]:
    """Runs `_cached_compile` over `jobs`, in `workers` spawned processes (1: in this one)."""
    if workers <= 1 or len(jobs) <= 1:
        return [_cached_compile(j) for j in jobs]
    context = multiprocessing.get_context("spawn")  # a forked JAX runtime is not safe
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_cached_compile, jobs))


# ----------------------------------------------------------------------------- the plans

def trained_towers(config, frozen) -> dict[str, bool]:
    """{tower: all its parameters frozen} for the towers that may be scanned and rematerialised."""
    return {t: t in frozen and all(jax.tree.leaves(frozen[t])) for t in aot.scannable_layers(config)
            if t in config.model}


def enumerate_plans(config, devices: int, space: Space, frozen_towers: dict[str, bool]) -> list[Plan]:
    batch = config.data.global_batch_size
    per_tower = [[(t, p) for p in (("none",) if frozen else space.policies)] for t, frozen in frozen_towers.items()]
    plans = []
    for tensor, data, accum in itertools.product(space.tensor, space.data, space.accum):
        if devices % (tensor * data) or batch % accum:
            continue
        fsdp = devices // (tensor * data)
        if (batch // accum) % (data * fsdp):
            continue  # the micro-batch does not split over the batch axes
        for remat, scan in itertools.product(itertools.product(*per_tower), space.scan):
            plans.append(Plan(data, fsdp, tensor, accum, tuple(remat), scan))
    return plans


def _state_bytes(config, plan: Plan, devices) -> int:
    """Per-device parameter + optimizer bytes of the plan (no compile); -1: the mesh does not divide
    the parameters."""
    planned = config_lib.with_overrides(config, plan.overrides())
    mesh = mesh_lib.make_mesh(planned.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(planned.mesh.rules):
        try:
            setup = trainer.build(planned, mesh)
            return aot.state_bytes_per_device(trainer.abstract_state(setup))
        except ValueError as e:
            if type(e).__name__ != "IndivisibleError":
                raise
            return -1


def _probe_config(config, plan: Plan, depths: dict[str, int]):
    """The plan's step unrolled at `depths` layers per tower, one micro-batch as the whole batch."""
    overrides = dict(plan.overrides(), **{"train.grad_accum_steps": 1,
                                          "data.global_batch_size": config.data.global_batch_size // plan.accum})
    for tower, key in aot.scannable_layers(config).items():
        if tower in depths:
            overrides[f"model.{tower}.{key}"] = depths[tower]
            overrides[f"model.{tower}.scan_layers"] = False
    return config_lib.with_overrides(config, overrides)


def _saving_least(plan: Plan) -> int:
    """Orders plans by how little their remat policies save (the largest: the heaviest remat)."""
    return sum(SAVES_MOST_FIRST.index(policy) for _, policy in plan.remat)


def _probe_depths(plans_group: list[Plan], towers: list[str]) -> tuple[Plan, list[tuple[Plan, dict]]]:
    """The probes a mesh + micro-batch group needs: (reference plan, [(plan, depths)]). The reference
    plan (the one saving least, so that it compiles where any does) at one layer each and at two
    layers of each tower in turn; then, for every other policy of a tower, the reference with that
    tower's policy changed, at two layers."""
    reference = max(plans_group, key=_saving_least)
    ones = {t: 1 for t in towers}
    probes = [(reference, ones)] + [(reference, dict(ones, **{t: 2})) for t in towers]
    seen = set(reference.remat)
    for plan in plans_group:
        for tower, policy in plan.remat:
            if (tower, policy) not in seen:
                seen.add((tower, policy))
                changed = dataclasses.replace(reference, remat=tuple((t, policy if t == tower else p)
                                                                     for t, p in reference.remat))
                probes.append((changed, dict(ones, **{tower: 2})))
    return reference, probes


def _solve_layers(reference: Plan, probes: list[tuple[Plan, dict]], results: list[dict], towers: list[str],
                  field: str) -> tuple[float, dict]:
    """(outer, {(tower, policy): per layer}) of one quantity, from the probes' linear model."""
    base = results[0][field]
    ref_policy = dict(reference.remat)
    layer = {(t, ref_policy[t]): results[1 + i][field] - base for i, t in enumerate(towers)}
    outer = base - sum(layer.values())
    for (plan, depths), result in zip(probes[1 + len(towers):], results[1 + len(towers):]):
        tower = next(t for t, d in depths.items() if d == 2)
        others = sum(layer[(t, ref_policy[t])] for t in towers if t != tower)
        layer[(tower, dict(plan.remat)[tower])] = (result[field] - outer - others) / 2
    return outer, layer


def _estimate(plan: Plan, outer: dict, layer: dict, layer_counts: dict) -> tuple[float, float]:
    """(seconds, bytes) of the whole step; bytes add the gradient accumulator (f32 parameters)
    when there is more than one micro-batch."""
    seconds = plan.accum * (outer["seconds"] + sum(layer["seconds"][(t, p)] * layer_counts[t] for t, p in plan.remat))
    memory = outer["bytes"] + sum(layer["bytes"][(t, p)] * layer_counts[t] for t, p in plan.remat)
    return seconds, memory


@dataclasses.dataclass
class Result:
    candidates: list[Candidate]  # the best (highest estimated MFU that fits by its own compile) first
    probes: int  # probe compiles (cached ones included)
    compiled: int  # compiles run now (the rest came from the cache)
    seconds: float


def search(config, target: str, space: Space = Space(), *, margin: float = 0.1, verify: int = 1, jobs: int = 1,
           max_compiles: int = 40, cache_dir: str = "") -> Result:
    """Every candidate plan of `space` with its estimate and verdict."""
    start = time.perf_counter()
    devices, chip = aot.target_devices(target)
    budget = (chip.hbm_bytes if chip else float("inf")) * (1 - margin)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        setup = trainer.build(config, mesh)
    analytic = setup.task.step_flops(setup.abstract_params, setup.optimizer.frozen) / len(devices)
    towers = trained_towers(config, setup.optimizer.frozen)
    layer_counts = {t: config.model[t][key] for t, key in aot.scannable_layers(config).items() if t in towers}
    candidates = [Candidate(p) for p in enumerate_plans(config, len(devices), space, towers)]
    logging.info("%d candidate plans", len(candidates))

    groups: dict[tuple, list[Candidate]] = {}  # mesh + micro-batch: the probes are shared
    for c in candidates:
        c.state_bytes = _state_bytes(config, c.plan, devices)
        if c.state_bytes < 0:
            c.verdict = "mesh: the parameters do not split over it"
        elif c.state_bytes > budget:
            c.verdict = f"state: parameters + optimizer state alone take {c.state_bytes / topology_lib.GIB:.1f} GiB"
        else:
            groups.setdefault((c.plan.data, c.plan.fsdp, c.plan.tensor, c.plan.accum, c.plan.scan), []).append(c)

    jobs_list, layout = [], []
    for group in groups.values():
        reference, probes = _probe_depths([c.plan for c in group], list(towers))
        layout.append((group, reference, probes, len(jobs_list)))
        jobs_list += [(_probe_config(config, plan, depths), target, cache_dir) for plan, depths in probes]
    logging.info("%d probe compiles for %d mesh / micro-batch groups", len(jobs_list), len(groups))
    results = compile_all(jobs_list, jobs)
    compiled_now = sum(not r["cached"] for r in results)

    for group, reference, probes, first in layout:
        probe_results = results[first:first + len(probes)]
        if any(r["error"] for r in probe_results[:1 + len(towers)]):
            for c in group:
                c.verdict = "probe: " + next(r["error"] for r in probe_results if r["error"])
            continue
        failed = {(t, dict(plan.remat)[t]) for (plan, depths), r in zip(probes, probe_results) if r["error"]
                  for t, d in depths.items() if d == 2}
        usable = [(pd, r) for pd, r in zip(probes, probe_results) if not r["error"]]
        # the TPU cost model gives negative times for some programs (v5e, v6e): a linear solve over them
        # can still come out positive, and meaningless
        timed = all(r["seconds"] >= 0 for _, r in usable)
        if not timed:
            logging.warning("negative cost-model times among the probes of %s: its plans are not ranked by speed",
                            group[0].plan.describe())
        model = {field: _solve_layers(reference, [u[0] for u in usable], [u[1] for u in usable], list(towers), field)
                 for field in ("seconds", "bytes")}
        outer = {f: m[0] for f, m in model.items()}
        layer = {f: m[1] for f, m in model.items()}
        for c in group:
            if failed & set(c.plan.remat):
                c.verdict = "probe: two layers of a tower already run out of memory"
                continue
            c.estimated_seconds, c.estimated_bytes = _estimate(c.plan, outer, layer, layer_counts)
            c.estimated_seconds = c.estimated_seconds if timed else 0.0
            if c.plan.accum > 1:
                c.estimated_bytes += c.state_bytes / 3  # the gradient accumulator: one more copy of the parameters
            c.mfu = analytic / (c.estimated_seconds * chip.peak_bf16_flops) if chip and c.estimated_seconds > 0 else 0.0

    def verify_in_order(ranked: list[Candidate], limit: int) -> tuple[int, int]:
        """Compiles `ranked` in order until `verify` fit or `limit` compiled -> (fitted, compiled now)."""
        fitted = now = done = 0
        while ranked[done:] and fitted < verify and done < limit:
            batch = ranked[done:done + min(max(jobs, 1), limit - done)]
            done += len(batch)
            compiled = compile_all([(config_lib.with_overrides(config, c.plan.overrides()), target, cache_dir)
                                    for c in batch], jobs)
            now += sum(not r["cached"] for r in compiled)
            for c, result in zip(batch, compiled):
                c.compiled = result
                if result["error"]:
                    c.verdict = "compiled: " + result["error"]
                elif result["bytes"] > budget:
                    c.verdict = f"compiled: {result['bytes'] / topology_lib.GIB:.1f} GiB, over the margin"
                else:
                    c.verdict = "fits"
                    fitted += 1
        return fitted, now

    ranked = sorted((c for c in candidates if not c.verdict), key=lambda c: -c.mfu)
    fitted, now = verify_in_order(ranked, max_compiles)
    compiled_now += now
    if not fitted:  # the first-fit plans: each group's heaviest remat
        heaviest = [max((c for c in group if not c.verdict), default=None, key=lambda c: _saving_least(c.plan))
                    for group, *_ in layout]
        compiled_now += verify_in_order(sorted((c for c in heaviest if c), key=lambda c: -c.mfu), len(heaviest))[1]
    for c in ranked:
        c.verdict = c.verdict or (NOT_COMPILED if fitted else f"not compiled (max_compiles={max_compiles} reached)")
    order = {"fits": 0, NOT_COMPILED: 1}
    return Result(sorted(candidates, key=lambda c: (order.get(c.verdict, 2), -c.mfu)), len(jobs_list), compiled_now,
                  time.perf_counter() - start)


def format_table(candidates: list[Candidate], limit: int = 0) -> str:
    """The candidates as a markdown table (the first `limit`), and a count of the rest's verdicts."""
    gib = topology_lib.GIB
    lines = ["| plan | state GiB | est. GiB | compiled GiB | est. step | est. MFU | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in candidates[:limit or None]:
        compiled = f"{c.compiled['bytes'] / gib:.1f}" if c.compiled and "bytes" in c.compiled else ""
        step = (f"{c.estimated_seconds:.2f} s" if c.estimated_seconds >= 1 else f"{c.estimated_seconds * 1e3:.1f} ms"
                if c.estimated_seconds > 0 else "")
        lines.append(f"| {c.plan.describe()} | {max(c.state_bytes, 0) / gib:.1f} | "
                     f"{c.estimated_bytes / gib:.1f} | {compiled} | {step} | {c.mfu:.1%} | {c.verdict} |")
    rest = collections.Counter(c.verdict.split(":")[0] for c in candidates[limit or len(candidates):])
    if rest:
        lines.append("not shown (plans by verdict): " + ", ".join(f"{verdict} {n}" for verdict, n in rest.most_common()))
    return "\n".join(lines)


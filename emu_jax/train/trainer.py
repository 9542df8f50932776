"""The training loop, top to bottom: start-up -> mesh -> model and shardings -> optimizer -> input
pipeline -> state (restored or initialised sharded) -> jitted steps -> loop -> final evaluation.

    python -m emu_jax.train --config=configs/tiny.py --workdir=/tmp/emu_tiny

A workdir that holds checkpoints resumes from the latest finished one (parameters, optimizer
state, data-iterator position), so a preempted or killed run continues exactly.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from emu_jax.checkpoint import (Checkpointer, CheckpointWriteError, abstract_with_shardings, restore_params,
                                stored_shapes)
from emu_jax.data import pipeline
from emu_jax.eval import evaluators
from emu_jax.models import lora as lora_lib
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.train import flops as flops_lib
from emu_jax.train import stages
from emu_jax.train.metrics import MetricsWriter, MetricsWriteError
from emu_jax.train.optimizer import make_optimizer, path_name
from emu_jax.train.profiling import ProfileConfigError, ProfileWindow
from emu_jax.train.step import TrainState, make_eval_step, make_train_step
from emu_jax.train.tasks import make_task


class WorkdirBusy(RuntimeError):
    """Another training run holds the workdir."""


def lock_workdir(workdir: str):
    """One run per workdir: two runs in one directory would interleave metrics and checkpoints.
    Each process of a run locks its own file (the processes of one run share the workdir); the
    kernel releases a lock when its holder dies, so a killed run leaves nothing stale. Returns the
    open lock file (closing it releases the lock)."""
    path = os.path.join(workdir, f".lock.process_{jax.process_index()}")
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise WorkdirBusy(f"workdir {workdir} is in use by another training run (its process "
                          f"{jax.process_index()} holds {path}); give this run its own --workdir") from None
    except OSError as e:  # a filesystem without locks (some network mounts): run unguarded
        logging.warning("cannot lock %s (%s): nothing stops a second run in the same workdir", path, e)
    return handle


class SkipGuard:
    """`nonfinite="skip"` drops non-finite updates; this halts a run that keeps doing so (more than
    `max_total` in all, or more than `max_consecutive` in a row; 0 turns a cap off), naming the step,
    instead of a run that "finishes" having learnt nothing."""

    def __init__(self, max_total: int, max_consecutive: int):
        self.max_total, self.max_consecutive = max_total, max_consecutive
        self.total = self.consecutive = 0

    def record(self, step: int, finite: bool) -> None:
        self.consecutive = 0 if finite else self.consecutive + 1
        self.total += not finite
        if self.max_consecutive and self.consecutive > self.max_consecutive:
            why = f"{self.consecutive} consecutive updates (steps {step - self.consecutive + 1}-{step})"
        elif self.max_total and self.total > self.max_total:
            why = f"{self.total} updates in this run"
        else:
            return
        raise FloatingPointError(f"non-finite loss or gradients at step {step}: {why} skipped, over the cap "
                                 f"(train.max_consecutive_skipped={self.max_consecutive}, "
                                 f"train.max_skipped_updates={self.max_total}); the latest checkpoint holds the "
                                 f"last good state")


# Errors that end a run with one line (the CLI prints them without a traceback): a busy workdir,
# a mesh or batch the devices cannot take, a run that keeps producing non-finite updates, a full disk.
# and data or checkpoints that are not there (a shard glob that matches nothing, a typo in train.init_from)
RUN_ERRORS = (WorkdirBusy, FloatingPointError, mesh_lib.MeshError, CheckpointWriteError, evaluators.EvalConfigError,
              FileNotFoundError, pipeline.records.SourceError, MetricsWriteError, ProfileConfigError)


class StopRequests:
    """SIGTERM (a preemption) and a first Ctrl-C become flags the loop checks between steps, so the
    data workers and their shared-memory batches are shut down from a known state and an async
    checkpoint in flight is finished. SIGTERM saves the step reached and returns normally; Ctrl-C
    saves nothing and ends as an interrupted run (KeyboardInterrupt). A second Ctrl-C interrupts at
    once, e.g. during a long compile.

    In a multi-process run SIGTERM is left to JAX's preemption service (on by default): a notice to
    any process reaches them all, and they agree on the step to save (`Checkpointer.preemption_at`).
    Each process saving the step it had reached when its own notice came would leave one waiting in a
    collective the others never join, as schedulers notify hosts at different moments. For the same
    reason a first Ctrl-C there is a preemption notice too (`agreed`): every process saves the agreed
    step, then the interrupted ones end as interrupted runs and the others return as preempted."""

    def __init__(self):
        self.preempted = self.interrupted = False
        self.agreed = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        if not self.agreed:
            signal.signal(signal.SIGTERM, self.preempt)
        signal.signal(signal.SIGINT, self._interrupt)

    @property
    def requested(self) -> bool:
        return self.preempted or self.interrupted

    def preempt(self, *unused):
        self.preempted = True

    def _interrupt(self, *unused):
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.agreed:  # JAX's notifier holds SIGTERM: it tells the service, which tells every process
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def stops_here(self) -> bool:
        """Whether the loop ends at this step on this process's word alone (a Ctrl-C, one process)."""
        return self.interrupted and not self.agreed

    def end_of_loop(self):
        """Past the loop (final evaluation, or an error on its way out) Ctrl-C interrupts at once."""
        signal.signal(signal.SIGINT, signal.default_int_handler)


def init_params(model, inputs, shardings, seed: int, prng: str = "threefry2x32"):
    """Parameters created already sharded: each device computes only its own shards; `prng` names
    the key implementation (config.init_prng)."""
    def init(key):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
        return nn.unbox(model.init(key, **zeros)["params"])

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed, impl=prng))


def load_towers(params, init_from, abstract, shardings):
    """Replaces whole towers (e.g. "vit", "llm") with those of converted or trained checkpoints;
    towers given an empty path keep their initialisation, and LoRA adapters (which a base
    checkpoint does not hold) keep theirs. A parameter the model has grown along one axis (a
    vocabulary with added tokens: Emu2 -> Emu2-Chat's [USER], [ASSISTANT]) takes the checkpoint's
    rows and keeps its initialisation in the new ones."""
    for tower, path in init_from.items():
        if not path:
            continue
        if tower not in params:
            raise KeyError(f"train.init_from names tower {tower!r}; the model has {sorted(params)}")
        base, _ = lora_lib.split(abstract_with_shardings(abstract[tower], shardings[tower]))
        stored = stored_shapes(path)[tower]
        grown = {}

        def as_stored(key_path, leaf):
            shape = _at(stored, key_path)
            if shape is None or tuple(shape) == leaf.shape:
                return leaf
            if len(shape) != leaf.ndim or any(s > m for s, m in zip(shape, leaf.shape)):
                raise ValueError(f"train.init_from.{tower}: {tower}{jax.tree_util.keystr(key_path)} is {shape} in "
                                 f"{path}, the model's is {leaf.shape}: only growing a dimension is supported")
            grown[key_path] = shape
            return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=leaf.sharding)

        restored = restore_params(path, {tower: jax.tree_util.tree_map_with_path(as_stored, base)})[tower]
        _, adapters = lora_lib.split(params[tower])
        initial, _ = lora_lib.split(params[tower])

        def fill(key_path, loaded, init):
            if key_path not in grown:
                return loaded
            logging.warning("train.init_from.%s: %s%s grows from %s to %s; the new entries keep their "
                            "initialisation", tower, tower, jax.tree_util.keystr(key_path), grown[key_path], init.shape)
            return jax.jit(lambda i, x: i.at[tuple(slice(0, s) for s in x.shape)].set(x),
                           out_shardings=init.sharding)(init, loaded)

        restored = jax.tree_util.tree_map_with_path(fill, restored, initial)
        params = dict(params, **{tower: lora_lib.join(restored, adapters)})
    return params


def _at(tree, key_path):
    """The entry of a nested dict at a jax key path (None where it has none)."""
    for key in key_path:
        if not isinstance(tree, dict) or key.key not in tree:
            return None
        tree = tree[key.key]
    return tree


def saved_part(config):
    """What of the parameters a checkpoint holds: all, or with `optimizer.train_only` only those
    (the rest is rebuilt on resume from `train.init_from` or the seeded initialisation)."""
    pattern = config.optimizer.get("train_only")
    if not pattern:
        return lambda params: params

    def trainable(params):
        kept = jax.tree_util.tree_map_with_path(
            lambda path, x: x if re.search(pattern, path_name(path)) else None, params)
        return prune(kept)
    return trainable


def prune(tree):
    """A nested dict without its None leaves and the dicts they leave empty."""
    if not isinstance(tree, dict):
        return tree
    out = {k: prune(v) for k, v in tree.items() if v is not None}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def state_shardings(optimizer, abstract_params, param_shardings, mesh, ema: bool = False):
    abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a frozen parameter's empty state)
    # optax finds the parameter-shaped parts by calling init on a placeholder; abstractly, since
    # eager ops under a mesh of abstract (ahead-of-time) devices cannot run.
    init = lambda placeholder: jax.eval_shape(optimizer.tx.init, placeholder)  # noqa: E731
    opt_shardings = optax.tree_map_params(init, lambda p, s: p if masked(p) else s, abstract_opt,
                                          param_shardings, transform_non_params=lambda _: mesh_lib.replicated(mesh),
                                          is_leaf=masked)
    scalar = mesh_lib.replicated(mesh)
    return abstract_opt, TrainState(step=scalar, params=param_shardings, opt_state=opt_shardings,
                                    skipped_updates=scalar, ema=param_shardings if ema else None)


def held_out_loss(eval_step, params, task, mesh, batches: int) -> dict:
    """Mean held-out metrics over a fixed number of eval batches (same pipeline, no shuffling). Each
    batch is taken while the devices run the one before; the metrics are read together at the end."""
    outputs = [eval_step(params, pipeline.to_global(batch, mesh))
               for batch, _ in zip(task.dataset("eval", worker_count=0), range(batches))]
    totals = {}
    for metrics in jax.device_get(outputs):
        for key in task.metric_keys:
            totals[key] = totals.get(key, 0.0) + float(metrics[key])
    return {f"eval/{k}": v / max(len(outputs), 1) for k, v in totals.items()}


@dataclasses.dataclass
class WindowClock:
    """Where a log window's wall time went: its steps, the run's first step apart (it compiles the
    step function), and the rest (logging, held-out loss, evaluators, checkpoint saves). The loop
    takes a step's batch and dispatches it while the devices still run the step before, so a step's
    time runs from when the host read the previous step's results (or took this step's batch, if
    later: after a pause for an evaluation or a save) to when it reads this one's: in a run of steps
    the rate the run advances at, and step time, tokens/s and MFU are the steps' own, so the window
    after an evaluation or the one that compiled does not read as slow steps. `data_wait_s` is the
    host's time taking a step's batch from the pipeline and placing it on the devices; near
    `step_time_s` the input is the limit."""
    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: list = dataclasses.field(default_factory=list)
    data_waits: list = dataclasses.field(default_factory=list)
    first_step: float | None = None

    def __post_init__(self):
        self.read = self.start  # when the host last read a step's results

    def record(self, started: float, fetched: float, *, compiles: bool) -> None:
        """The host has just read the results of the step whose batch it began taking at `started`
        and had placed at `fetched`."""
        now = time.perf_counter()
        seconds, self.read = now - max(started, self.read), now
        if compiles:
            self.first_step = seconds
        else:
            self.steps.append(seconds)
            self.data_waits.append(fetched - started)

    def scalars(self, tokens_per_step: float, images_per_step: float, seconds_at_peak: float) -> dict:
        """`seconds_at_peak`: a step's model FLOPs / the devices' peak FLOP/s (0: no MFU)."""
        timed = sum(self.steps) + (self.first_step or 0.0)
        scalars = {"overhead_s": time.perf_counter() - self.start - timed}
        if self.first_step is not None:
            scalars["first_step_s"] = self.first_step
        if self.steps:
            seconds = float(np.mean(self.steps))
            scalars.update(step_time_s=seconds, tokens_per_s=tokens_per_step / seconds,
                           images_per_s=images_per_step / seconds, data_wait_s=float(np.mean(self.data_waits)))
            if seconds_at_peak:
                scalars["mfu"] = seconds_at_peak / seconds
        return scalars


def window_summary(window: list[dict], clock: WindowClock, metric_keys, seconds_at_peak: float) -> dict:
    """The logged scalars of a window of steps' metrics (host values) and its clock."""
    summary = {k: float(np.mean([m[k] for m in window])) for k in tuple(metric_keys) + ("grad_norm", "learning_rate")}
    summary.update(clock.scalars(float(np.mean([m["tokens"] for m in window])),
                                 float(np.mean([m["images"] for m in window])), seconds_at_peak))
    events = np.sum([m["events"] for m in window], axis=0)
    summary.update({f"data/{name}": float(n) for name, n in zip(pipeline.EVENTS, events)})
    return summary


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the train step is built from, for one config on one mesh: the task, the optimizer, and
    the abstract parameters / optimizer state with their shardings. Training and the ahead-of-time
    compile (`emu_jax.train.aot`) both start here, so they compile the same step."""
    task: Any
    optimizer: Any
    abstract_params: Any
    abstract_opt: Any
    shardings: TrainState  # of NamedShardings
    batch_sharding: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def build(config, mesh) -> Setup:
    """Call under `jax.set_mesh(mesh)` and the config's logical axis rules."""
    task = make_task(config)
    abstract_params, param_shardings = mesh_lib.abstract_model(task.model, task.example_inputs(), mesh,
                                                               config.mesh.rules)
    optimizer = make_optimizer(config.optimizer, abstract_params, config.train.steps, stages.freezes(config.stages))
    abstract_opt, shardings = state_shardings(optimizer, abstract_params, param_shardings, mesh,
                                              config.train.ema_decay > 0)
    return Setup(task, optimizer, abstract_params, abstract_opt, shardings,
                 mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh))


def jit_train_step(config, setup: Setup):
    """The train step jitted with the state's and batch's shardings; the state is donated."""
    tc = config.train
    step = make_train_step(setup.task, setup.optimizer, tc.grad_accum_steps, seed=config.seed,
                           ema_decay=tc.ema_decay)
    return jax.jit(step, in_shardings=(setup.shardings, setup.batch_sharding),
                   out_shardings=(setup.shardings, setup.replicated), donate_argnums=0)


def abstract_state(setup: Setup) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=setup.replicated)
    params = abstract_with_shardings(setup.abstract_params, setup.shardings.params)
    opt_state = abstract_with_shardings(setup.abstract_opt, setup.shardings.opt_state)
    return TrainState(step=scalar, params=params, opt_state=opt_state, skipped_updates=scalar,
                      ema=params if setup.shardings.ema is not None else None)


def use_compilation_cache(workdir: str) -> None:
    """Compiled programs persist in `<workdir>/compilation_cache` (JAX's persistent cache, for the
    programs that took over its 1 s threshold to compile), so a resumed or preempted run steps without
    compiling again (a large step compiles for minutes); JAX_COMPILATION_CACHE_DIR, where set, names
    another (e.g. one shared by runs). For the process of one run (the CLI): JAX opens its cache at
    the first compilation and keeps it for the process."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compilation_cache"))


def train(config, workdir: str) -> dict:
    tc = config.train
    # ---------------------------------------------------------------- start-up and mesh
    mesh_lib.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    mesh = mesh_lib.make_mesh(config.mesh)  # checked before the workdir is touched
    evaluators.check(config.evals)
    mesh_lib.check_batch(config.data.global_batch_size, mesh, tc.grad_accum_steps)
    profile = ProfileWindow.from_config(tc.profile, workdir, tc.steps)
    os.makedirs(workdir, exist_ok=True)
    workdir_lock = lock_workdir(workdir)
    writer = MetricsWriter(workdir, enabled=is_main)
    stops = StopRequests()
    skips = SkipGuard(tc.max_skipped_updates, tc.max_consecutive_skipped)
    rules = config.mesh.rules
    batch_sharding, replicated = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ------------------------------------------------------------ model, optimizer, shardings
        setup = build(config, mesh)
        task, optimizer, shardings = setup.task, setup.optimizer, setup.shardings
        param_shardings = setup.shardings.params
        model, inputs = task.model, task.example_inputs()
        use_ema = tc.ema_decay > 0

        # ------------------------------------------------------------ input pipeline
        train_iter = iter(task.dataset("train"))

        # ------------------------------------------------------------ state: resume or initialise
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                                    every=tc.checkpoint_every, async_save=tc.async_checkpoints,
                                    saved=saved_part(config))
        latest = checkpointer.latest_step()

        def initial():
            params = init_params(model, inputs, param_shardings, config.seed, config.init_prng)
            return load_towers(params, tc.init_from, setup.abstract_params, param_shardings)

        if latest is not None:
            state, meta = checkpointer.restore(latest, abstract_state(setup), train_iter)
            if config.optimizer.get("train_only"):  # the checkpoint holds the trained part alone
                base = initial()
                state = state.replace(params=lora_lib.join(base, state.params),
                                      ema=None if state.ema is None else lora_lib.join(base, state.ema))
            skipped = meta["skipped_updates"]
        else:
            params = initial()
            opt_state = jax.jit(optimizer.tx.init, out_shardings=shardings.opt_state)(params)
            copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)
            state = TrainState(step=None, params=params, opt_state=opt_state, skipped_updates=None,
                               ema=copy(params) if use_ema else None)
            latest, skipped = 0, 0
        profile.resumed_after(latest)
        if latest >= tc.steps:  # e.g. a shorter run asked of a finished run's workdir
            logging.warning("the checkpoint in %s is at step %d, past train.steps=%d: no step to train (the final "
                            "evaluation runs on it)", workdir, latest, tc.steps)
        state = state.replace(step=jax.device_put(jnp.int32(latest), replicated),
                              skipped_updates=jax.device_put(jnp.int32(skipped), replicated))

        # ------------------------------------------------------------ steps
        train_step = jit_train_step(config, setup)
        eval_step = jax.jit(make_eval_step(task, config.seed), in_shardings=(param_shardings, batch_sharding),
                            out_shardings=replicated)
        step_flops = task.step_flops(setup.abstract_params, optimizer.frozen)
        peak = flops_lib.peak_flops_per_device() * jax.device_count() if step_flops else 0.0
        def evaluation(step: int) -> evaluators.Context:  # evaluators see the EMA where there is one
            return evaluators.Context(task, state.ema if use_ema else state.params, step, writer, workdir, mesh)

        # ------------------------------------------------------------ loop
        progress = tqdm(total=tc.steps, initial=latest, disable=not is_main, desc="train", unit="step")
        window, clock = [], WindowClock()
        in_flight = None  # (step, metrics, started, fetched) of a step dispatched but not yet read

        def read(step: int, metrics, started: float, fetched: float) -> None:
            finite = bool(metrics["finite"])  # waits for the step
            clock.record(started, fetched, compiles=step == latest + 1)
            if tc.nonfinite == "halt" and not finite:
                raise FloatingPointError(f"non-finite loss or gradients at step {step}; the update was dropped "
                                         f"and nothing from this step is checkpointed")
            skips.record(step, finite)
            window.append(metrics)

        try:
            for step in range(latest + 1, tc.steps + 1):
                logs = step % tc.log_every == 0 or step == tc.steps
                held_out = bool(tc.eval_every) and step % tc.eval_every == 0
                evaluates = evaluators.due(config.evals, step, final=False)
                saves = step == tc.steps or checkpointer.due(step)
                profile.begin(step)
                started = time.perf_counter()
                with profile.annotate(step):  # in a trace: the batch, the dispatch, the wait for the step before
                    batch = pipeline.to_global(next(train_iter), mesh)
                    fetched = time.perf_counter()
                    state, metrics = train_step(state, batch)
                    if in_flight:  # the host reads the previous step while the devices run this one
                        read(*in_flight)
                    in_flight = (step, metrics, started, fetched)
                    # the results of a step the host acts on are read at once (a checkpoint never holds
                    # an unread step); the others a step late
                    acts = (logs or held_out or evaluates or saves or step == latest + 1 or stops.requested
                            or profile.ends_at(step))
                    if acts:
                        read(*in_flight)
                        in_flight = None
                if not acts:
                    progress.update(1)
                    continue
                profile.after(step, (state, metrics))  # writing the trace counts as overhead, not as a step
                if logs:
                    summary = window_summary(jax.device_get(window), clock, task.metric_keys,
                                             step_flops / peak if step_flops else 0.0)
                    summary["skipped_updates"] = float(jax.device_get(state.skipped_updates))
                    writer.scalars(step, summary)
                    progress.set_postfix(loss=f"{summary['loss']:.3f}")
                    window, clock = [], WindowClock()
                if held_out:
                    writer.scalars(step, held_out_loss(eval_step, state.params, task, mesh, tc.eval_batches))
                if evaluates:  # every process: params span them all
                    evaluators.run(config.evals, evaluation(step))
                if stops.stops_here:
                    break
                if checkpointer.preemption_at(step):  # the step the processes agreed on (multi-process)
                    stops.preempt()
                preempted = stops.preempted  # read once: a SIGTERM landing after the save must not skip it
                if saves or preempted:  # forced: `due` has decided (asking Orbax again would repeat its checks)
                    checkpointer.save(step, state, train_iter, {"skipped_updates": int(state.skipped_updates)},
                                      force=True)
                progress.update(1)
                if preempted:
                    break
        except OSError:  # a write in the workdir failed (a full disk): an asynchronous checkpoint save that met
            checkpointer.wait()  # it too fails here, says so and removes its unfinished step; else this error
            raise
        finally:  # also on an error or Ctrl-C: stop the data workers and free their prefetched batches
            stops.end_of_loop()
            progress.close()
            train_iter.close()
            if not stops.preempted:  # a window the loop ended inside (a preempted run saves its checkpoint first)
                profile.stop()
        checkpointer.wait()
        checkpointer.close()
        profile.stop()
        if stops.interrupted:
            raise KeyboardInterrupt

        # ------------------------------------------------------------ final evaluation (every process)
        result = {"step": int(state.step), "skipped_updates": int(jax.device_get(state.skipped_updates))}
        if not stops.preempted:
            result.update(evaluators.run(config.evals, evaluation(int(state.step)), final=True))
        writer.close()
        workdir_lock.close()
        return result

"""The training loop's step time beside its compiled step's alone and the host's time per batch,
measured in one run.

    python benchmarks/train_loop.py [--steps=150 --worker_count=0]

The loop is the trainer's (`trainer.train`, configs/tiny.py on the digits world, evaluators off):
it takes a step's batch from the input pipeline and places it on the devices while they still run
the step before, and reads a step's results only when it acts on them (a log, an evaluation, a
checkpoint). Its step time (the logged `step_time_s`, the compiling window left out) is set beside
- the bare step: the same jitted step run back to back on one placed batch (the devices' time);
- the host's time per batch (the logged `data_wait_s`: taking it from the pipeline, placing it);
as two ratios: loop / max(bare step, host) (1.0: the host's work hides behind the devices' entirely)
and loop / (bare step + host) (the time of a loop that waits for each step before it takes the next
batch; below 1.0 is what overlapping saves).

The CPU plays an accelerator and its host: XLA runs single-threaded (`--xla_cpu_multi_thread_eigen=false`,
set here before JAX starts), so one core runs the step while the other takes the batches, and
`--worker_count=0` has the host build the batches itself (no data worker processes; on the digits
world, whose images are augmented per read, a batch then costs about what a step does), the case
where the input would otherwise add to every step.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ["TQDM_DISABLE"] = "1"  # the loop's progress bar
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from emu_jax import config_lib  # noqa: E402
from emu_jax.data import pipeline  # noqa: E402
from emu_jax.parallel import mesh as mesh_lib  # noqa: E402
from emu_jax.train import trainer  # noqa: E402
from emu_jax.train.step import TrainState  # noqa: E402

flags.DEFINE_integer("steps", 150, "Steps of the loop (logged in windows of --log_every; the first window, "
                     "which compiles, is left out).")
flags.DEFINE_integer("log_every", 25, "Steps per logged window.")
flags.DEFINE_integer("worker_count", 0, "Data worker processes (0: the host builds each batch itself).")
flags.DEFINE_integer("bare_steps", 20, "Back-to-back steps per timing of the bare step (best of 3).")
FLAGS = flags.FLAGS


def config_for():
    config = config_lib.load(os.path.join(ROOT, "configs", "tiny.py"))
    with config.unlocked():
        config.train.update(steps=FLAGS.steps, log_every=FLAGS.log_every, eval_every=0,
                            checkpoint_every=10 * FLAGS.steps)
        config.data.worker_count = FLAGS.worker_count
        config.evals = {}
    return config


def loop_times(config) -> tuple[float, float]:
    """(median step_time_s, median data_wait_s) of the loop's logged windows after the first."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train(config, workdir)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    windows = [row for row in rows if "step_time_s" in row and "first_step_s" not in row]
    return (float(np.median([w["step_time_s"] for w in windows])),
            float(np.median([w["data_wait_s"] for w in windows])))


def bare_step_time(config) -> float:
    """Seconds per step of the trainer's jitted step alone, dispatched back to back on one placed batch."""
    mesh = mesh_lib.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        setup = trainer.build(config, mesh)
        params = trainer.init_params(setup.task.model, setup.task.example_inputs(), setup.shardings.params,
                                     config.seed)
        opt_state = jax.jit(setup.optimizer.tx.init, out_shardings=setup.shardings.opt_state)(params)
        state = TrainState(step=jax.device_put(np.int32(0), setup.replicated), params=params, opt_state=opt_state,
                           skipped_updates=jax.device_put(np.int32(0), setup.replicated))
        batches = iter(setup.task.dataset("train", worker_count=0))
        batch = pipeline.to_global(next(batches), mesh)
        batches.close()
        step = trainer.jit_train_step(config, setup)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(FLAGS.bare_steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            best = min(best, (time.perf_counter() - start) / FLAGS.bare_steps)
    return best


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = config_for()
    bare = bare_step_time(config)
    loop, host = loop_times(config)
    print(f"device: {jax.devices()[0].device_kind}, XLA single-threaded; configs/tiny.py, "
          f"{config.data.global_batch_size} x {config.data.seq_len} tokens, data workers {FLAGS.worker_count}")
    print(f"bare step {bare * 1e3:.1f} ms; host per batch {host * 1e3:.1f} ms; loop step {loop * 1e3:.1f} ms")
    print(f"loop / max(bare step, host) {loop / max(bare, host):.2f} (1.0: the host's work hidden); "
          f"loop / (bare step + host) {loop / (bare + host):.2f} (below 1.0: saved by overlapping)")


if __name__ == "__main__":
    app.run(main)

"""Achieved FLOP/s of the real train step beside the device's matmul FLOP/s, measured in one run.

    python benchmarks/train_step_flops.py                       # configs/small.py on the CPU, float32
    python benchmarks/train_step_flops.py --config=configs/small.py --batch=8 --seq_len=512 --dtype=bfloat16

The step is the trainer's own (`make_train_step`: forward, backward, AdamW update) on random
tokens and images; its FLOPs are counted analytically (`emu_jax.train.flops`), causal attention in full
(PaLM's convention; the XLA path computes 5/8 of it at 512 positions, so the count is ~2% above the
work done: 77 of 1235 GFLOP are attention's, counted in full). The reference is a
square matmul of --matmul_size in the same dtype, jitted and timed in the same process. Both are
best-of-N timings (shared CPUs are noisy). Prints both and their ratio. XLA runs with its
default flags here (unlike the train CLI, which turns YNNPACK fusions off for faster convolutions):
that also makes the reference matmul fastest, so the ratio is against the best matmul we measured.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from emu_jax import tokens as tokens_lib
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.train import flops as flops_lib
from emu_jax.train import trainer
from emu_jax.train.optimizer import make_optimizer
from emu_jax.train.step import TrainState, make_train_step
from emu_jax.train.tasks import EmuTask

config_flags.DEFINE_config_file("config", "configs/small.py", "Model config.")
flags.DEFINE_integer("batch", 4, "Rows per step.")
flags.DEFINE_integer("seq_len", 512, "Tokens per row.")
flags.DEFINE_integer("images", 2, "Image slots per row.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
flags.DEFINE_string("dtype", "float32", "Compute dtype of model and matmul reference.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the reference matmul.")
FLAGS = flags.FLAGS


def random_batch(config, model, rng, b: int, t: int, n: int):
    """b rows of t random tokens with n image blocks each, and n random images per row."""
    special = config.model.tokens
    block = tokens_lib.image_block(special, model.visual_tokens_per_image)
    tokens = rng.randint(3, 500, size=(b, t)).astype(np.int32)
    for row in range(b):
        for i in range(n):
            start = 1 + i * (len(block) + 8)
            tokens[row, start:start + len(block)] = block
    segments = np.ones((b, t), np.int32)
    text_mask, regression_mask = tokens_lib.loss_masks(tokens, segments, special)
    size = config.model.vit.image_size
    return {"tokens": tokens, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "segment_ids": segments,
            "images": rng.randint(0, 255, size=(b, n, size, size, 3)).astype(np.uint8),
            "image_mask": np.ones((b, n), bool), "text_mask": text_mask, "regression_mask": regression_mask,
            "events": np.zeros((b, 9), np.int32)}


def measured_step(config, batch_size: int, seq_len: int, images: int, steps: int) -> tuple[list[float], float]:
    """(seconds of each timed step, analytic FLOPs of a step) of the trainer's step for `config`
    on this process's devices (data parallel), random tokens and images."""
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        task = EmuTask(config)
        model, inputs = task.model, task.example_inputs()
        abstract, param_shardings = mesh_lib.abstract_model(model, inputs, mesh, config.mesh.rules)
        optimizer = make_optimizer(config.optimizer, abstract, 1000)
        params = trainer.init_params(model, inputs, param_shardings, 0)
        state = TrainState(jnp.int32(0), params, jax.jit(optimizer.tx.init)(params), jnp.int32(0))
        step = jax.jit(make_train_step(task, optimizer), donate_argnums=0)
        batch = jax.device_put(random_batch(config, model, np.random.RandomState(0), batch_size, seq_len, images))
        _, _, times = flops_lib.time_train_steps(step, state, batch, steps)
    return times, task.family.train_flops(abstract, config.model, batch_size, seq_len, images)


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        config.model.dtype = FLAGS.dtype
    times, step_flops = measured_step(config, FLAGS.batch, FLAGS.seq_len, FLAGS.images, FLAGS.steps)
    seconds, median = min(times), float(np.median(times))
    achieved = step_flops / seconds
    matmul = flops_lib.measure_matmul_flops(FLAGS.matmul_size, jnp.dtype(FLAGS.dtype))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, dtype {FLAGS.dtype}")
    print(f"train step: {step_flops / 1e9:.1f} GFLOP in {seconds * 1e3:.1f} ms (best of {FLAGS.steps}; median "
          f"{median * 1e3:.1f} ms) = {achieved / 1e9:.1f} GFLOP/s")
    print(f"matmul {FLAGS.matmul_size}^2: {matmul / 1e9:.1f} GFLOP/s")
    print(f"ratio train step / matmul: {achieved / matmul:.2f}")


if __name__ == "__main__":
    app.run(main)

"""The peak FLOP/s of the devices, and timing helpers for MFU. A train step's model FLOPs come
from its model family (`train_flops`, models/families.py)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks per chip, by `device.device_kind` prefix.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
    """The best FLOP/s of `repeats` timed square matmuls on the default device (a practical peak;
    best-of because shared CPUs are noisy, and the train-step benchmark times its steps the same way).
    Random operands: a GPU multiplies constant data measurably faster (less switching power)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def time_train_steps(step, state, batch, count: int):
    """Runs `step` once (warm-up), then `count` timed steps to completion; returns
    (state, last metrics, seconds per step) for best-of / median reporting."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, metrics, times


def peak_flops_per_device(device=None) -> float:
    device = device or jax.devices()[0]
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops
    return measure_matmul_flops()

"""Analytical FLOPs of a train step (for MFU) and the peak FLOP/s of the devices.

XLA's cost analysis counts a scanned layer once, so the count is derived from the parameter
shapes: 6 FLOPs per parameter per token for the matmuls (forward + backward), plus attention's
12 * layers * width * length per token; the ViT runs on every image slot of the batch, and only
forward (2 per parameter) when it is frozen.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks per chip, by `device.device_kind` prefix.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def _matmul_params(tree) -> int:
    """Parameters used in matmuls: 2-D-or-more kernels and embeddings used as heads."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def step_flops(abstract_params, model_config, batch: int, seq_len: int, image_slots: int,
               vit_trainable: bool = True) -> float:
    """FLOPs of one train step on `batch` rows of `seq_len` tokens with `image_slots` images each."""
    llm, vit = model_config.llm, model_config.vit
    llm_params = _matmul_params({k: v for k, v in abstract_params["llm"].items() if k != "embed_tokens"})
    text = batch * seq_len * (6 * llm_params + 12 * llm.num_layers * llm.hidden * seq_len)
    patches = 1 + (vit.image_size // vit.patch_size) ** 2
    per_param = 6 if vit_trainable else 2
    vit_params = _matmul_params(abstract_params["vit"])
    images = batch * image_slots * patches * (per_param * vit_params + 2 * per_param * vit.depth * vit.width * patches)
    connector = batch * image_slots * patches * 6 * _matmul_params(abstract_params["connector"])
    return float(text + images + connector)


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
    """The best FLOP/s of `repeats` timed square matmuls on the default device (a practical peak;
    best-of because shared CPUs are noisy, and the train-step benchmark times its steps the same way)."""
    a = jnp.ones((size, size), dtype)
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

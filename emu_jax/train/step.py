"""The train and eval steps: pure functions of (state, batch), jitted by the trainer with
NamedSharding in/out shardings over the mesh and the state donated.

Gradient accumulation splits the global batch into `accum_steps` micro-batches and scans over
them; each micro-batch's loss is normalised by the whole batch's token counts, so the
accumulated gradient equals the full-batch gradient. A non-finite loss or gradient never
reaches the parameters: the update is skipped (and counted); with `nonfinite="halt"` the
trainer then stops with the step number.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax



@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped_updates: jax.Array  # non-finite steps whose update was dropped
    ema: Any = None  # exponential moving average of params (when `train.ema_decay` > 0)


def step_key(seed: int, step) -> jax.Array:
    """The step's randomness (diffusion noise, dropout): a pure function of seed and step, so a
    resumed run draws exactly what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.key(seed), step)


def _micro_batches(batch: dict, accum_steps: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)


def make_train_step(task, optimizer, accum_steps: int = 1, *, seed: int = 0, ema_decay: float = 0.0) -> Callable:
    """`task.loss(params, batch, rng, norms, step) -> (loss, metrics)` with `norms = task.loss_norms(batch)`
    (the whole batch's counts each loss term is divided by); `task.counters(batch)` adds
    throughput and data-pipeline counts to the metrics."""
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)

    def gradients(params, batch, rng, step):
        norms = task.loss_norms(batch)
        if accum_steps == 1:
            return grad_fn(params, batch, rng, norms, step)

        def accumulate(total, micro):
            index, micro_batch = micro
            (_, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), norms, step)
            return jax.tree.map(jnp.add, total, (metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], _micro_batches(batch, accum_steps))
        zeros = jax.tree.map(jnp.zeros_like,
                             (jax.eval_shape(lambda: grad_fn(params, first, rng, norms, step)[0][1]), params))
        (metrics, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), _micro_batches(batch, accum_steps)))
        return (metrics["loss"], metrics), grads

    def train_step(state: TrainState, batch: dict):
        (loss, metrics), grads = gradients(state.params, batch, step_key(seed, state.step), state.step)
        # Static: XLA drops the weight-gradient matmuls of parameters frozen from the start.
        grads = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads, optimizer.frozen)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Selecting makes XLA copy every donated parameter and moment first (the old values are read after
        # the new are written); a lax.cond skips without copies (configs/small.py CPU step 4% faster) but
        # rounds the update differently, which moves every README training figure: it lands with a rerun of
        # benchmarks/readme_figures.py.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        ema = state.ema
        if ema is not None:
            ema = keep(optax.incremental_update(params, ema, 1.0 - ema_decay), ema)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32), ema=ema)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=optimizer.schedule(state.step), finite=finite,
                       **task.counters(batch))
        return new_state, metrics

    return train_step


def make_eval_step(task, seed: int = 0) -> Callable:
    """Held-out metrics with a fixed key (the same noise at every evaluation)."""
    def eval_step(params, batch):
        return task.loss(params, batch, jax.random.key(seed), task.loss_norms(batch), None)[1]
    return eval_step

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

from emu_jax.data.pipeline import model_inputs
from emu_jax.train.losses import emu_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped_updates: jax.Array  # non-finite steps whose update was dropped


def make_loss_fn(model, loss_config) -> Callable:
    def loss_fn(params, batch, norms=(None, None)):
        out = model.apply({"params": params}, **model_inputs(batch))
        return emu_loss(out, batch, text_weight=loss_config.text_weight,
                        regression_weight=loss_config.regression_weight, norms=norms)
    return loss_fn


def _micro_batches(batch: dict, accum_steps: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)


def make_train_step(model, optimizer, loss_config, accum_steps: int = 1) -> Callable:
    loss_fn = make_loss_fn(model, loss_config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch):
        norms = (batch["text_mask"].sum(), batch["regression_mask"].sum())
        if accum_steps == 1:
            return grad_fn(params, batch, norms)

        def accumulate(total, micro):
            (_, metrics), grads = grad_fn(params, micro, norms)
            return jax.tree.map(jnp.add, total, (metrics, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, (jax.eval_shape(lambda: grad_fn(params, batch, norms)[0][1]), params))
        (metrics, grads), _ = jax.lax.scan(accumulate, zeros, _micro_batches(batch, accum_steps))
        metrics = dict(metrics, text_tokens=norms[0], regression_tokens=norms[1])
        return (metrics["loss"], metrics), grads

    def train_step(state: TrainState, batch: dict):
        (loss, metrics), grads = gradients(state.params, batch)
        grads = jax.tree.map(lambda g, frozen: jnp.zeros_like(g) if frozen else g, grads, optimizer.frozen)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=optimizer.schedule(state.step),
                       finite=finite, tokens=(batch["segment_ids"] > 0).sum(), images=batch["image_mask"].sum(),
                       events=batch["events"].sum(0))
        return new_state, metrics

    return train_step


def make_eval_step(model, loss_config) -> Callable:
    loss_fn = make_loss_fn(model, loss_config)

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    return eval_step

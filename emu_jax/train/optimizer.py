"""The optimizer: optax AdamW with warmup + decay, global-norm clipping, a weight-decay mask, and
per-tower freezing and learning-rate multipliers chosen by regular expressions over parameter
paths such as `vit/blocks_3/attn/qkv/kernel` (config.optimizer; no branches in code).

The whole policy is the optax transformation: the train step only computes gradients, updates
and applies them. Frozen parameters get no optimizer state (`optax.set_to_zero`); the step also
zeroes their gradients statically (`Optimizer.frozen`), so XLA drops their weight-gradient
computations. `freeze_later` [(regex, step)] freezes parameters part-way through a run (a staged
recipe, `config.stages`): from the optimizer's update number `step` on, their gradients are zeroed
before clipping (the global norm no longer counts them) and their updates after Adam (whose moments
would otherwise keep moving them).
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    frozen: Any  # tree of bools, True where the parameter is frozen from the start


class FreezeState(NamedTuple):
    count: jax.Array  # updates made so far


def zero_from_step(mask, step: int) -> optax.GradientTransformation:
    """Zeroes the updates of the parameters `mask` selects from the `step`-th update on."""
    def init(params):
        del params
        return FreezeState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        frozen_now = state.count >= step
        updates = jax.tree.map(lambda u, m: jnp.where(frozen_now, jnp.zeros_like(u), u) if m else u, updates, mask)
        return updates, FreezeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine / linear decay to end_lr_fraction of it, or constant."""
    peak, warmup = config.learning_rate, config.warmup_steps
    end = peak * config.end_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    decays = {"cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction),
              "linear": optax.linear_schedule(peak, end, decay_steps),
              "constant": optax.constant_schedule(peak)}
    if config.decay not in decays:
        raise ValueError(f"optimizer.decay must be one of {sorted(decays)}, not {config.decay!r}")
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decays[config.decay]], [warmup])


def param_labels(params, config) -> Any:
    """'frozen', or 'lr_x<multiplier>' from the first matching (regex, multiplier) rule."""
    def label(path, _):
        name = path_name(path)
        if config.freeze and re.search(config.freeze, name):
            return "frozen"
        if config.get("train_only") and not re.search(config.train_only, name):
            return "frozen"
        for pattern, multiplier in config.lr_multipliers:
            if re.search(pattern, name):
                return f"lr_x{float(multiplier)}"
        return "lr_x1.0"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params, total_steps: int, freeze_later=()) -> Optimizer:
    """`params` may be abstract (ShapeDtypeStructs); only paths are read."""
    lr = schedule(config, total_steps)
    labels = param_labels(params, config)
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: not re.search(config.no_decay, path_name(path)), params)
    transforms = {"frozen": optax.set_to_zero()}
    for label in set(jax.tree.leaves(labels)) - {"frozen"}:
        multiplier = float(label.removeprefix("lr_x"))
        transforms[label] = optax.adamw(lambda step, m=multiplier: lr(step) * m, b1=config.b1, b2=config.b2,
                                        eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.multi_transform(transforms, labels))
    for pattern, step in freeze_later:
        later = jax.tree_util.tree_map_with_path(lambda path, _: bool(re.search(pattern, path_name(path))), params)
        tx = optax.chain(zero_from_step(later, step), tx, zero_from_step(later, step))
    return Optimizer(tx, lr, jax.tree.map(lambda label: label == "frozen", labels))

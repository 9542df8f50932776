"""Emu's training objective: next-text-token cross-entropy plus next-visual-embedding regression.

Both terms are means over the positions their masks select (see `emu_jax.models.tokens.loss_masks`)
and are weighted by the config (stage 1: text only; gen fine-tune: regression only; ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from emu_jax.models.emu import EmuOutput


def masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = mask.sum()
    return (values * mask).sum() / jnp.maximum(count, 1.0), count


def text_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array):
    """Cross-entropy of the prediction at t against tokens[t + 1], over mask[t]."""
    next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), next_tokens)
    return masked_mean(ce, mask)


def regression_loss(regression: jax.Array, targets: jax.Array, mask: jax.Array):
    """Mean squared error (over features) between the prediction at t and the next visual embedding."""
    sq = jnp.mean(jnp.square(regression.astype(jnp.float32) - targets.astype(jnp.float32)), axis=-1)
    return masked_mean(sq, mask)


def emu_loss(out: EmuOutput, batch: dict, *, text_weight: float, regression_weight: float):
    """(weighted total, metrics) for one batch with `tokens`, `text_mask`, `regression_mask`."""
    text, text_count = text_loss(out.logits, batch["tokens"], batch["text_mask"])
    regress, regress_count = regression_loss(out.regression, out.regression_targets, batch["regression_mask"])
    total = text_weight * text + regression_weight * regress
    return total, {"loss": total, "text_loss": text, "regression_loss": regress,
                   "text_tokens": text_count, "regression_tokens": regress_count}

"""Emu's training objective: next-text-token cross-entropy plus next-visual-embedding regression.

Both terms are means over the positions their masks select (see `emu_jax.tokens.loss_masks`)
and are weighted by the config (stage 1: text only; gen fine-tune: regression only; ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from emu_jax.models.emu import EmuOutput


def masked_mean(values: jax.Array, mask: jax.Array, norm=None) -> tuple[jax.Array, jax.Array]:
    """Sum of values over the mask divided by `norm` (default: the mask's own count). Passing the
    whole batch's count makes micro-batch losses add up to the full-batch mean exactly."""
    count = mask.sum()
    return (values * mask).sum() / jnp.maximum(count if norm is None else norm, 1.0), count


def text_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array, norm=None):
    """Cross-entropy of the prediction at t against tokens[t + 1], over mask[t]."""
    next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), next_tokens)
    return masked_mean(ce, mask, norm)


def regression_loss(regression: jax.Array, targets: jax.Array, mask: jax.Array, norm=None):
    """Mean squared error (over features) between the prediction at t and the next visual embedding."""
    sq = jnp.mean(jnp.square(regression.astype(jnp.float32) - targets.astype(jnp.float32)), axis=-1)
    return masked_mean(sq, mask, norm)


def emu_loss(out: EmuOutput, batch: dict, *, text_weight: float, regression_weight: float, norms=(None, None)):
    """(weighted total, metrics) for one batch with `tokens`, `text_mask`, `regression_mask`;
    `norms` = (text, regression) token counts to divide by, default this batch's own."""
    text, text_count = text_loss(out.logits, batch["tokens"], batch["text_mask"], norms[0])
    regress, regress_count = regression_loss(out.regression, out.regression_targets, batch["regression_mask"],
                                             norms[1])
    total = text_weight * text + regression_weight * regress
    return total, {"loss": total, "text_loss": text, "regression_loss": regress,
                   "text_tokens": text_count, "regression_tokens": regress_count}

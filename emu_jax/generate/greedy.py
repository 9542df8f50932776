"""Greedy text decoding with the KV cache, jitted as one prefill and a `fori_loop` of one-token steps.

Prompts are left-padded (segment id 0 on padding; positions start at 0 on the first real token).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id"))
def greedy_decode(model, params, tokens, positions, segment_ids, images, *, max_new_tokens: int, eos_id: int):
    """-> new token ids [B, max_new_tokens]; after EOS a row repeats EOS."""
    batch, length = tokens.shape
    cache = model.llm.init_cache(batch, length + max_new_tokens)

    def prefill(m):
        embeddings, _ = m.embed(tokens, images)
        return m.decode(embeddings, positions, segment_ids, cache)

    def one_token(m, token, position, cache):
        return m.decode(m.llm.embed(token[:, None]), position[:, None], jnp.ones_like(token)[:, None], cache)

    logits, _, cache = model.apply({"params": params}, method=prefill)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def body(i, carry):
        cache, token, out, done = carry
        out = out.at[:, i].set(jnp.where(done, eos_id, token))
        done = done | (token == eos_id)
        logits, _, cache = model.apply({"params": params}, token, positions[:, -1] + 1 + i, cache, method=one_token)
        return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), out, done

    _, _, out, _ = jax.lax.fori_loop(0, max_new_tokens, body, (cache, token, out, done))
    return out

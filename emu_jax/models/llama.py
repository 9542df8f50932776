"""LLaMA, the language tower of Emu (13B) and Emu2 (33B).

    tokens -> embed_tokens -> [input_layernorm -> self_attn (rotary, causal, optional GQA) -> +
                               post_attention_layernorm -> mlp (SwiGLU) -> +] x num_layers
           -> norm -> lm_head (untied)

Parameter names follow the Hugging Face checkpoints (`model.layers.{n}.self_attn.q_proj` ->
`layers_{n}/self_attn/q_proj/kernel`, or `layers/...` with a leading layer axis when scanned).
Decoding uses an explicit `layers.KVCache`: every layer's keys and values, the segment id of every
cache slot (0 = empty or left padding) and the next write index.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from emu_jax.models import layers
from emu_jax.models.layers import Attention, Mlp, RMSNorm, constrain


class DecoderLayer(nn.Module):
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_hidden: int
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.input_layernorm = RMSNorm(self.norm_eps, **kw)
        self.self_attn = Attention(self.num_heads, self.head_dim, num_kv_heads=self.num_kv_heads,
                                   implementation=self.attention_impl, lora=self.lora, **kw)
        self.post_attention_layernorm = RMSNorm(self.norm_eps, **kw)
        self.mlp = Mlp(self.mlp_hidden, activation="silu", gated=True,
                       names=("gate_proj", "up_proj", "down_proj"), lora=self.lora, **kw)

    def __call__(self, x, cache, shared):
        rope, mask = shared
        h, cache = self.self_attn(self.input_layernorm(x), mask=mask, rope=rope, cache=cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("act_batch", "act_len", "act_embed")), cache


class Llama(nn.Module):
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    mlp_hidden: int
    num_kv_heads: int = 0  # 0: as many as query heads (no grouping)
    head_dim: int = 0  # 0: hidden // num_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    logits_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(self.vocab_size, self.hidden,
                                     embedding_init=layers.partitioned(layers.default_init, ("vocab", "embed")),
                                     **kw)
        self.layers = layers.make_stack(
            DecoderLayer, self.num_layers, scan=self.scan_layers, remat=self.remat, hidden=self.hidden,
            num_heads=self.num_heads, num_kv_heads=self.kv_heads, head_dim=self.dim_per_head,
            mlp_hidden=self.mlp_hidden, norm_eps=self.norm_eps, attention_impl=self.attention_impl, lora=self.lora,
            **kw)
        self.norm = RMSNorm(self.norm_eps, **kw)
        self.lm_head = layers.dense(self.vocab_size, ("embed", "vocab"), name="lm_head",
                                    dtype=self.logits_dtype, param_dtype=self.param_dtype, lora=self.lora)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return constrain(self.embed_tokens(tokens), ("act_batch", "act_len", "act_embed"))

    def __call__(self, embeddings, positions, segment_ids, cache=None):
        """Runs the decoder stack on input embeddings [B, T, hidden]; returns the final-normed
        hidden states and the updated cache (None when decoding without one).

        positions: [B, T] rotary positions (restart at 0 for each packed document / after left
        padding); segment_ids: [B, T], 0 for padding, tokens attend only within their segment."""
        rope = layers.rotary_tables(positions, self.dim_per_head, self.rope_theta)
        if cache is None:
            mask = layers.SegmentMask(segment_ids)
            x, _ = layers.apply_stack(self.layers, self.num_layers, embeddings, None, (rope, mask))
            return self.norm(x), None
        cache = cache.append_segments(segment_ids)
        q_index = cache.index + jnp.arange(embeddings.shape[1])[None]
        mask = layers.attention_mask(segment_ids, cache.segment_ids, q_index=q_index,
                                     kv_index=jnp.arange(cache.max_len)[None])
        x, cache = layers.apply_stack(self.layers, self.num_layers, embeddings, cache, (rope, mask))
        return self.norm(x), cache.advance(embeddings.shape[1])

    def logits(self, hidden: jax.Array) -> jax.Array:
        return constrain(self.lm_head(hidden), ("act_batch", "act_len", "act_vocab"))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> layers.KVCache:
        """An empty cache with room for `max_len` positions."""
        return layers.KVCache.empty(self.num_layers, batch, max_len, self.kv_heads, self.dim_per_head,
                                    dtype or self.dtype, stacked=self.scan_layers)

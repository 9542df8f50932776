"""Emu1's connector: the Causal Transformer between EVA-CLIP and LLaMA.

    ViT tokens [N, 257, 1408] -> ln_visual (LayerNorm)
    32 learned causal_tokens -> [ self-attention (causal, unscaled, T5 relative position bias
                                  computed once and shared by every block)
                                  cross-attention to the ViT tokens (k/v project 1408 -> 768)
                                  ReLU FFN ] x 12, each sub-layer pre-norm T5-RMS + residual
                             -> final_layer_norm -> projection (768 -> LLM width, with bias)
    LLM hidden states -> stu_regress_head (LLM width -> LLM width, no bias): regressed embeddings,
    which are fed back to the LLM as they are.

Names follow the released checkpoint: `ln_visual`, `cformer.causal_tokens`, `cformer.projection`,
`cformer.cformer.block.{j}.layer.{0,1,2}...`, `decoder.lm.stu_regress_head` (our
`stu_regress_head`). T5 keeps the relative-bias table inside block 0's self-attention; here it
sits beside the blocks (`cformer/cformer/relative_attention_bias`) so that all blocks are equal.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from emu_jax.models import layers
from emu_jax.models.layers import Attention, Mlp, RMSNorm


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's unidirectional bucketing of (key - query): exact below num_buckets/2, then
    logarithmic up to max_distance. Returns int [length(query), length(key)]."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    n = np.maximum(-rel, 0)
    max_exact = num_buckets // 2
    safe = np.maximum(n, 1).astype(np.float32)
    large = max_exact + (np.log(safe / max_exact) / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int32)
    return np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))


class T5AttentionLayer(nn.Module):
    """layer_norm -> attention (self or cross; T5 scales nothing) -> residual."""
    attention_name: str
    num_heads: int
    head_dim: int
    norm_eps: float
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x, kv_input=None, *, mask=None, bias=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.norm_eps, name="layer_norm", **kw)(x)
        h, _ = Attention(self.num_heads, self.head_dim, names=("q", "k", "v", "o"), scale=1.0,
                         implementation=self.attention_impl, lora=self.lora, name=self.attention_name, **kw)(
            h, kv_input, mask=mask, bias=bias)
        return x + h


class T5FeedForwardLayer(nn.Module):
    d_ff: int
    norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.norm_eps, name="layer_norm", **kw)(x)
        return x + Mlp(self.d_ff, activation="relu", names=("wi", "wo"), lora=self.lora, name="DenseReluDense",
                       **kw)(h)


class CausalFormerBlock(nn.Module):
    num_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    def setup(self):
        kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, norm_eps=self.norm_eps,
                  attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        self.layer = [T5AttentionLayer("SelfAttention", **kw), T5AttentionLayer("EncDecAttention", **kw),
                      T5FeedForwardLayer(self.d_ff, self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                         lora=self.lora)]

    def __call__(self, x, unused_cache, shared):
        vision, position_bias, causal_mask = shared
        x = self.layer[0](x, mask=causal_mask, bias=position_bias)
        x = self.layer[1](x, vision)
        return self.layer[2](x), None


class T5DecoderStack(nn.Module):
    """T5's decoder stack driven by input embeddings (no token embedding): `cformer.cformer`."""
    d_model: int
    num_layers: int
    num_heads: int
    head_dim: int
    d_ff: int
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.relative_attention_bias = nn.Embed(
            self.num_buckets, self.num_heads,
            embedding_init=layers.partitioned(layers.default_init, (None, "heads")), **kw)
        self.block = layers.make_stack(
            CausalFormerBlock, self.num_layers, scan=self.scan_layers, remat=self.remat,
            num_heads=self.num_heads, head_dim=self.head_dim, d_ff=self.d_ff, norm_eps=self.norm_eps,
            attention_impl=self.attention_impl, lora=self.lora, **kw)
        self.final_layer_norm = RMSNorm(self.norm_eps, **kw)

    def __call__(self, queries, vision):
        length = queries.shape[1]
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        bias = jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))[None]
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x, _ = layers.apply_stack(self.block, self.num_layers, queries, None, (vision, bias, causal))
        return self.final_layer_norm(x)


class CausalFormer(nn.Module):
    """`cformer`: learned queries -> T5 decoder stack (`cformer.cformer`) -> projection."""
    cformer: T5DecoderStack
    llm_hidden: int
    num_queries: int = 32

    @nn.compact
    def __call__(self, vision):
        stack = self.cformer
        tokens = self.param("causal_tokens", layers.partitioned(layers.default_init, (None, None, "embed")),
                            (1, self.num_queries, stack.d_model), stack.param_dtype)
        queries = jnp.broadcast_to(tokens.astype(stack.dtype), (vision.shape[0],) + tokens.shape[1:])
        x = stack(queries, vision)
        return layers.dense(self.llm_hidden, ("embed", "mlp"), use_bias=True, name="projection",
                            dtype=stack.dtype, param_dtype=stack.param_dtype, lora=stack.lora)(x)


class CausalFormerConnector(nn.Module):
    """Emu1's ViT -> LLM bridge and its regression head (see the module docstring)."""
    vision_width: int
    llm_hidden: int
    num_queries: int = 32
    ln_visual_eps: float = 1e-6  # Emu1/models/modeling_emu.py: LayerNorm(eps=1e-6)
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @property
    def num_visual_tokens(self) -> int:
        return self.num_queries

    @property
    def target_width(self) -> int:
        return self.llm_hidden

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stack = T5DecoderStack(self.d_model, self.num_layers, self.num_heads, self.head_dim, self.d_ff,
                               num_buckets=self.num_buckets, max_distance=self.max_distance,
                               norm_eps=self.norm_eps, scan_layers=self.scan_layers, remat=self.remat,
                               attention_impl=self.attention_impl, lora=self.lora, parent=None, **kw)
        self.ln_visual = layers.layer_norm(self.ln_visual_eps, name=None, **kw)
        self.cformer = CausalFormer(stack, self.llm_hidden, self.num_queries)
        self.stu_regress_head = layers.dense(self.llm_hidden, ("embed", "mlp"), name=None, lora=self.lora, **kw)

    def encode(self, vit_tokens):
        """ViT tokens -> (LLM input embeddings, regression targets); in Emu1 they are the same."""
        embeds = self.cformer(self.ln_visual(vit_tokens))
        return embeds, embeds

    def regress(self, hidden):
        return self.stu_regress_head(hidden)

    def feed_back(self, regressed):
        return regressed

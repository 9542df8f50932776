"""Building blocks shared by every tower: projections, norms, one MLP, one attention, layer stacks.

Logical axis names (the config's rules table is the only place that maps them to mesh axes):
  weights      embed, mlp, heads, kv_heads, head_dim, qkv, vocab, norm, layers, patch_height, patch_width,
               channels, conv_height, conv_width, conv_in, conv_out, latent
  activations  act_batch, act_len, act_embed, act_heads, act_head_dim, act_mlp, act_vocab
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from emu_jax.models import lora as lora_lib

Dtype = Any
ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # EVA-CLIP: exact erf GELU
    "relu": nn.relu,
    "silu": nn.silu,
}

# The models' default weight init; converted checkpoints overwrite it anyway.
default_init = nn.initializers.normal(stddev=0.02)


def partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `contract` axes of x. The kernel is created
    in its final shape [*in_axes, *features] (flax's DenseGeneral initialises a flat matrix and
    reshapes it, which trips logical sharding constraints under a mesh)."""
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    contract: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: lora_lib.LoraSpec | None = None  # adapters where its targets match this module's path

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.contract:]
        kernel = self.param("kernel", partitioned(default_init, self.kernel_axes), in_shape + self.features,
                            self.param_dtype)
        y = _matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.contract)
        if self.lora is not None and self.lora.applies_to(self.path):
            y = lora_lib.adapt(self, x, y, self.kernel_axes, self.contract)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.kernel_axes[self.contract:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _matmul(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] as one 2-D matmul [rows, in] . [in, out]. (With the
    leading axes kept, XLA's CPU backend wrote the weight gradient's operand transposed, e.g. the
    SwiGLU gradient as [mlp, batch, length]: a gated MLP's forward + backward ran 1.35x slower.)"""
    lead, inner = x.shape[:x.ndim - contract], math.prod(x.shape[x.ndim - contract:])
    y = x.reshape(math.prod(lead), inner) @ kernel.reshape(inner, -1)
    return y.reshape(*lead, *kernel.shape[contract:])


def dense(features, kernel_axes, *, name, use_bias=False, axis=-1, dtype=jnp.float32,
          param_dtype=jnp.float32, lora=None) -> Dense:
    """A projection whose kernel carries logical axis names (input axes first, then output axes);
    `axis` is -1, or (-2, -1) to contract two trailing axes (e.g. heads and head_dim)."""
    features = (features,) if isinstance(features, int) else tuple(features)
    contract = 1 if isinstance(axis, int) else len(axis)
    return Dense(features, tuple(kernel_axes), contract, use_bias, dtype, param_dtype, lora, name=name)


class RMSNorm(nn.Module):
    """LLaMA's and T5's norm: x / rms(x) * scale, statistics in float32, no mean, no bias."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return x32.astype(self.dtype) * scale.astype(self.dtype)


def layer_norm(epsilon, *, name, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=partitioned(nn.initializers.zeros, ("norm",)))


def group_norm(groups, epsilon, *, name, dtype, param_dtype) -> nn.GroupNorm:
    """GroupNorm over channels-last feature maps (diffusers' `GroupNorm(groups, C, eps)`)."""
    return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=partitioned(nn.initializers.zeros, ("norm",)))


def conv(features, kernel_size=3, *, name=None, stride=1, padding=None, out_axis="conv_out", dtype=jnp.float32,
         param_dtype=jnp.float32) -> nn.Conv:
    """A biased NHWC convolution with kernel [kh, kw, in, out]; `padding` defaults to "same"-style
    symmetric padding of kernel_size // 2 (PyTorch's `padding=k // 2`). `out_axis` names the output
    channels' logical axis (the few convs that emit image or latent channels use "latent")."""
    pad = kernel_size // 2 if padding is None else padding
    pad = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=pad, name=name,
                   dtype=dtype, param_dtype=param_dtype,
                   kernel_init=partitioned(default_init, ("conv_height", "conv_width", "conv_in", out_axis)),
                   bias_init=partitioned(nn.initializers.zeros, (out_axis,)))


class Mlp(nn.Module):
    """The one feed-forward block: EVA (fc1, fc2; GELU; biases), T5 (wi, wo; ReLU), LLaMA
    (gate_proj, up_proj, down_proj; SwiGLU) and diffusers' GEGLU (one fused projection whose
    second half is the gate: `fused_gate`, names (proj, out)) differ only in these fields."""
    hidden: int
    activation: str = "gelu"
    gated: bool = False
    fused_gate: bool = False
    use_bias: bool = False
    names: tuple[str, ...] = ("fc1", "fc2")  # (in, out) or, gated, (gate, up, out)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: lora_lib.LoraSpec | None = None

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        act = ACTIVATIONS[self.activation]
        if self.fused_gate:
            value, gate = jnp.split(dense((2, self.hidden), ("embed", "qkv", "mlp"), name=self.names[0], **kw)(x),
                                    2, axis=-2)
            h = value[..., 0, :] * act(gate[..., 0, :])
        else:
            h = act(dense(self.hidden, ("embed", "mlp"), name=self.names[0], **kw)(x))
        if self.gated and not self.fused_gate:
            h = h * dense(self.hidden, ("embed", "mlp"), name=self.names[1], **kw)(x)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name=self.names[-1], **kw)(h)


# ----------------------------------------------------------------------------- rotary embedding

def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape [B, T, head_dim] in the rotate-half layout of Hugging Face LLaMA."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x: [B, T, H, D]; rotates pairs (i, i + D/2) as Hugging Face's `rotate_half` does."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated * sin[:, :, None]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- KV cache

@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer of a decoder stack, for decoding one chunk at a time.

    k, v: per layer [B*K, S, D], heads-major with batch and kv heads merged: exactly the operand of
    the attention's batched matmuls (`_xla_attention`), so the buffer a step updates in place is the
    one the matmul reads (a [B, S, K, D] buffer was transposed in full at every step on CPU; a
    [B, K, S, D] one needed a reshape that XLA fused into a second, copied update). Held as one
    buffer per layer (a tuple: an unscanned stack, whose layers are Python ints) or stacked
    [L, B*K, S, D] (a scanned stack indexes it by a traced layer): slicing a layer out of a stacked
    buffer copies it, twice per layer and step. segment_ids [B, S]: each slot's document (0 = empty
    or left padding); index: the next slot to write; layer: the layer `write` addresses
    (`apply_stack` sets it)."""
    k: Any
    v: Any
    segment_ids: jax.Array
    index: jax.Array
    layer: Any = 0

    @classmethod
    def empty(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, *,
              stacked: bool) -> "KVCache":
        """stacked: one [L, ...] buffer for a scanned stack, else one buffer per layer."""
        shape = (batch * kv_heads, max_len, head_dim)
        zeros = (jnp.zeros((num_layers, *shape), dtype) if stacked
                 else tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))
        return cls(zeros, zeros, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    def at_layer(self, layer) -> "KVCache":
        return self.replace(layer=layer)

    def append_segments(self, segment_ids: jax.Array) -> "KVCache":
        """Records the next chunk's segment ids [B, T] at the write index (before the layers run)."""
        return self.replace(segment_ids=jax.lax.dynamic_update_slice(
            self.segment_ids, segment_ids.astype(jnp.int32), (0, self.index)))

    def advance(self, length: int) -> "KVCache":
        """Moves the write index past a chunk of `length` (after the layers ran)."""
        return self.replace(index=self.index + length)

    def write(self, k: jax.Array, v: jax.Array):
        """Writes this layer's keys and values [B, T, K, D] of the chunk at the write index ->
        (cache, the layer's whole keys and values as [B, S, K, D] views)."""
        B, T, K, D = k.shape
        new = [x.transpose(0, 2, 1, 3).reshape(B * K, T, D) for x in (k, v)]
        if self.stacked:
            start = (self.layer, 0, self.index, 0)
            k_all, v_all = (jax.lax.dynamic_update_slice(buf, x[None].astype(buf.dtype), start)
                            for buf, x in zip((self.k, self.v), new))
            k_layer, v_layer = (jax.lax.dynamic_index_in_dim(b, self.layer, keepdims=False) for b in (k_all, v_all))
        else:
            k_layer, v_layer = (jax.lax.dynamic_update_slice(buf[self.layer], x.astype(buf[self.layer].dtype),
                                                             (0, self.index, 0))
                                for buf, x in zip((self.k, self.v), new))
            k_all, v_all = (tuple(x if i == self.layer else b for i, b in enumerate(buf))
                            for buf, x in ((self.k, k_layer), (self.v, v_layer)))
        view = lambda x: x.reshape(B, K, self.max_len, D).transpose(0, 2, 1, 3)  # noqa: E731
        return self.replace(k=k_all, v=v_all), view(k_layer), view(v_layer)

    def map_rows(self, fn) -> "KVCache":
        """fn(array, batch axis) on the per-row arrays (beam search repeats and reorders rows)."""
        batch = self.segment_ids.shape[0]

        def rows(buf):  # [.., B * K, S, D]: the batch axis split out for fn
            lead = buf.shape[:-3]
            out = fn(buf.reshape(*lead, batch, -1, *buf.shape[-2:]), len(lead))
            return out.reshape(*lead, -1, *buf.shape[-2:])
        return self.replace(k=jax.tree.map(rows, self.k), v=jax.tree.map(rows, self.v),
                            segment_ids=fn(self.segment_ids, 0))


# ----------------------------------------------------------------------------- attention

def attention_mask(q_segment_ids, kv_segment_ids, q_index=None, kv_index=None, causal=True):
    """Boolean [B, 1, T, S]: same non-padding document, and (causal) key slot <= query slot.

    Segment id 0 marks padding. A padding query may only see padding keys, and always sees
    itself when it is also a key, so no row is empty. Slots index the key/value buffer: for
    packed training they are 0..T-1; for cached decoding the query slots start at the cache index.
    """
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        T, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        q_index = jnp.arange(T)[None] if q_index is None else q_index
        kv_index = jnp.arange(S)[None] if kv_index is None else kv_index
        same &= q_index[:, :, None] >= kv_index[:, None, :]
    return same[:, None]


@flax.struct.dataclass
class SegmentMask:
    """Self-attention within packed documents (segment id 0 = padding, which sees only padding),
    causal by default: the same rule as `attention_mask(segment_ids, segment_ids)`, kept as segment
    ids so a kernel that takes them (TPU splash) never needs the dense [B, 1, T, T] mask."""
    segment_ids: jax.Array  # [B, T]
    causal: bool = flax.struct.field(pytree_node=False, default=True)

    def dense(self) -> jax.Array:
        return attention_mask(self.segment_ids, self.segment_ids, causal=self.causal)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def target_platform() -> str:
    """The platform the traced computation is for: the context mesh's devices (abstract TPU devices
    of an ahead-of-time compile included), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def choose_attention(implementation: str, q, k, mask, bias) -> str:
    """Resolves "auto": cuDNN flash attention on GPU for bf16/fp16 with head_dim <= 128 (multiple of
    8) and even lengths; the Pallas splash kernel on TPU for segment masks (or none) without bias at
    128-multiple lengths and head_dim; XLA otherwise (always on CPU; causal segment masks in query
    blocks: `_causal_xla_attention`)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    platform = target_platform()
    (_, T, _, D), S = q.shape, k.shape[1]
    if (platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and D <= 128 and D % 8 == 0
            and T % 2 == 0 and S % 2 == 0):
        return "cudnn"
    if (platform == "tpu" and (mask is None or isinstance(mask, SegmentMask)) and bias is None
            and T % 128 == 0 and S % 128 == 0 and D % 128 == 0):
        return "splash"
    return "xla"


def _splash_attention(q, k, v, mask: SegmentMask | None, scale: float):
    """The TPU splash kernel (interpreted off TPU, for tests), per device under shard_map: batch and
    heads stay sharded as the logical rules say; each device runs the kernel on its own rows."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T = q.shape[:2]
    segment_ids = jnp.ones((B, T), jnp.int32) if mask is None else mask.segment_ids.astype(jnp.int32)
    causal = mask is not None and mask.causal
    interpret = target_platform() != "tpu"

    def local(q, k, v, segment_ids):
        t, h, s = q.shape[1], q.shape[2], k.shape[1]
        head_mask = splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
        kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * h), head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        heads_first = lambda x: x.transpose(1, 0, 2)  # noqa: E731  (the kernel takes [heads, len, dim])
        one = lambda q, k, v, ids: heads_first(kernel(heads_first(q * scale), heads_first(k), heads_first(v),  # noqa: E731
                                                      segment_ids=splash.SegmentIds(ids, ids)))
        return jax.vmap(one)(q, k, v, segment_ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    qkv_spec = nn.logical_to_mesh_axes(("act_batch", None, "act_heads", None))
    ids_spec = nn.logical_to_mesh_axes(("act_batch", None))
    return jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, ids_spec), out_specs=qkv_spec,
                         check_vma=False)(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids)


def dot_product_attention(q, k, v, *, mask=None, bias=None, scale=None, implementation="auto"):
    """The project's one attention kernel. q: [B, T, H, D]; k, v: [B, S, K, D] with H % K == 0
    (grouped-query attention needs no repeat); mask: bool broadcastable to [B, H, T, S], or a
    SegmentMask; bias: float broadcastable to [B, H, T, S]. Softmax runs in float32 whatever the
    inputs' dtype. `implementation` ("auto", "xla", "cudnn", "splash"): see `choose_attention`."""
    implementation = choose_attention(implementation, q, k, mask, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "splash":
        if bias is not None or not (mask is None or isinstance(mask, SegmentMask)):
            raise ValueError("splash attention takes a SegmentMask (or no mask) and no bias")
        return _splash_attention(q, k, v, mask, scale)
    # cuDNN skips the key tiles above the diagonal only when told the mask is causal (given the
    # causal mask as a dense one, it computed every tile: forward + backward 1.46x slower on an H200)
    is_causal = implementation == "cudnn" and isinstance(mask, SegmentMask) and mask.causal
    if implementation == "xla" and isinstance(mask, SegmentMask) and mask.causal and bias is None:
        return _causal_xla_attention(q, k, v, mask.segment_ids, scale)
    if isinstance(mask, SegmentMask):
        mask = attention_mask(mask.segment_ids, mask.segment_ids, causal=mask.causal and not is_causal)
    if bias is not None:
        bias = bias.astype(q.dtype)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                            implementation="cudnn")
    return _xla_attention(q, k, v, mask, bias, scale)


def _by_kv_group(x: jax.Array, kv_heads: int) -> jax.Array:
    """A mask or bias broadcastable to [B, H, T, S] -> broadcastable to [B, K, H/K, T, S]."""
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    heads = x.shape[1]
    return x.reshape(x.shape[0], kv_heads, heads // kv_heads, *x.shape[2:]) if heads > 1 else x[:, :, None]


def _xla_attention(q, k, v, mask, bias, scale):
    """Softmax attention written out, scores and softmax in float32. Query heads are grouped by
    their kv head (no repeat), and batch and kv heads merge into one matmul batch axis with the keys
    as the left operand: a heads-major KV cache (`KVCache`) is then read as it lies. (With batch and
    kv heads as two batch axes, XLA's CPU backend transposed a layer's whole cache at every step
    whenever the batch was a single row.)"""
    B, T, H, D = q.shape
    S, K = k.shape[1:3]
    G = H // K
    rows = lambda x: x.transpose(0, 2, 1, 3).reshape(B * K, S, D)  # noqa: E731  [B, S, K, D] -> [BK, S, D]
    q = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, D)
    mask = None if mask is None else _by_kv_group(mask, K)
    bias = None if bias is None else _by_kv_group(bias, K)
    out = _softmax_attention(q, rows(k), rows(v), mask, bias, scale, (B, K, G, T, S))
    return out.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


CAUSAL_QUERY_BLOCKS = 4
MIN_CAUSAL_QUERY_BLOCK = 128


def _causal_xla_attention(q, k, v, segment_ids, scale):
    """Causal self-attention in query blocks, each over the keys up to its own end: 4 blocks do
    5/8 of the dense form's matmul and softmax work (the tiles above the diagonal are never
    computed). On the 2-core CPU: forward + backward of a [4, 512, 12, 64] layer 136-140 -> 84-95 ms,
    the configs/small.py train step 5.9-6.1 -> 5.6-5.8 s (alternating runs). Blocks are at least
    MIN_CAUSAL_QUERY_BLOCK queries: 8 blocks of 64 were slower than 4 of 128. Slicing the sequence is
    free while its axis ("act_len") is unsharded, as the rules table has it."""
    T = q.shape[1]
    block = max(-(-T // CAUSAL_QUERY_BLOCKS), MIN_CAUSAL_QUERY_BLOCK)
    outputs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        mask = attention_mask(segment_ids[:, start:end], segment_ids[:, :end],
                              q_index=jnp.arange(start, end)[None], kv_index=jnp.arange(end)[None])
        outputs.append(_xla_attention(q[:, start:end], k[:, :end], v[:, :end], mask, None, scale))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def _attention_probs(q, k, mask, bias, scale, dims):
    """q [BK, GT, D], k [BK, S, D] -> float32 probabilities [B, K, G, T, S]."""
    scores = jax.lax.dot_general(k, q, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    scores = scores.transpose(0, 2, 1).reshape(dims) * scale
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _weighted_values(probs, v):
    B, K, G, T, S = probs.shape
    return jax.lax.dot_general(probs.astype(v.dtype).reshape(B * K, G * T, S), v, (((2,), (1,)), ((0,), (0,))))


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _softmax_attention(q, k, v, mask, bias, scale, dims):
    """softmax(q k^T * scale + bias, masked) v over [BK, GT, D] queries and [BK, S, D] keys and
    values, with the backward pass written out (as FlashAttention's): the softmax gradient's row
    term is rowsum(dout * out), a [BK, GT] reduction of the output, not rowsum(dprobs * probs) over
    the [.., T, S] scores, which XLA's CPU backend fused into the dprobs matmul and ran at a
    sixth of its matmul rate."""
    return _weighted_values(_attention_probs(q, k, mask, bias, scale, dims), v)


def _softmax_attention_forward(q, k, v, mask, bias, scale, dims):
    probs = _attention_probs(q, k, mask, bias, scale, dims)
    out = _weighted_values(probs, v)
    return out, (q, k, v, mask, bias, probs, out)


def _softmax_attention_backward(scale, dims, residuals, dout):
    q, k, v, mask, bias, probs, out = residuals
    B, K, G, T, S = dims
    batched = lambda x, y, contract: jax.lax.dot_general(  # noqa: E731  one batch axis (0), float32 results
        x, y, (contract, ((0,), (0,))), preferred_element_type=jnp.float32)
    flat_probs = probs.astype(v.dtype).reshape(B * K, G * T, S)
    dv = batched(flat_probs, dout.astype(v.dtype), ((1,), (1,)))  # [BK, S, D]
    dprobs = batched(dout.astype(v.dtype), v, ((2,), (2,))).reshape(dims)  # [B, K, G, T, S]
    row = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).reshape(B, K, G, T, 1)
    dscores = probs * (dprobs - row)
    if mask is not None:  # as the forward's `where`: none through masked scores (a row all masked has uniform probs)
        dscores = jnp.where(mask, dscores, 0.0)
    dbias = None if bias is None else _sum_to_shape(dscores, bias.shape).astype(bias.dtype)
    dscaled = (dscores * scale).astype(q.dtype).reshape(B * K, G * T, S)
    dq = batched(dscaled, k, ((2,), (1,)))  # [BK, GT, D]
    dk = batched(dscaled, q, ((1,), (1,)))  # [BK, S, D]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, dbias


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def _sum_to_shape(x: jax.Array, shape: tuple) -> jax.Array:
    """x summed over the axes a broadcast of `shape` (same rank) expanded."""
    return jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


class Attention(nn.Module):
    """Multi-head attention shared by every tower.

    Layout options cover the released checkpoints: LLaMA (separate q/k/v/o, rotary, grouped
    kv heads), T5 (separate q/k/v/o, unscaled, additive position bias, cross-attention) and
    EVA-CLIP (one fused qkv kernel without bias, separate q and v biases, biased output).
    """
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    fused_qkv: bool = False
    qv_bias: bool = False  # EVA: separate q and v biases (k has none)
    qkv_bias: bool = False  # diffusers' VAE: biased q, k and v projections
    out_bias: bool = False
    names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # fused: ("qkv", "proj")
    scale: float | None = None  # None: 1/sqrt(head_dim)
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: lora_lib.LoraSpec | None = None

    def _project_qkv(self, x, kv_input):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        if self.fused_qkv:
            qkv = dense((3, self.num_heads, self.head_dim), ("embed", "qkv", "heads", "head_dim"),
                        name=self.names[0], **kw)(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            kv_heads = self.num_kv_heads or self.num_heads
            kw["use_bias"] = self.qkv_bias
            q = dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name=self.names[0], **kw)(x)
            k = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name=self.names[1], **kw)(kv_input)
            v = dense((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name=self.names[2], **kw)(kv_input)
        if self.qv_bias:
            shape = (self.num_heads, self.head_dim)
            init = partitioned(nn.initializers.zeros, ("heads", "head_dim"))
            q = q + self.param("q_bias", init, shape, self.param_dtype).astype(self.dtype)
            v = v + self.param("v_bias", init, shape, self.param_dtype).astype(self.dtype)
        return q, k, v

    @nn.compact
    def __call__(self, x, kv_input=None, *, mask=None, bias=None, rope=None, cache: KVCache | None = None):
        """Returns (output, updated cache). With a cache (pointed at this layer), the new keys and
        values are written at its index and the query attends over the layer's whole buffer."""
        if self.fused_qkv and kv_input is not None:
            raise ValueError("a fused qkv projection cannot cross-attend")
        q, k, v = self._project_qkv(x, x if kv_input is None else kv_input)
        q, k, v = (checkpoint_name(t, name) for t, name in zip((q, k, v), ("query_proj", "key_proj", "value_proj")))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            cache, k, v = cache.write(k, v)
        q = constrain(q, ("act_batch", "act_len", "act_heads", "act_head_dim"))
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, bias=bias,
                                    scale=self.scale, implementation=self.implementation)
        out = dense(x.shape[-1], ("heads", "head_dim", "embed"), name=self.names[-1], axis=(-2, -1),
                    use_bias=self.out_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                    lora=self.lora)(checkpoint_name(out, "attention_context"))
        return checkpoint_name(out, "out_proj"), cache


# ----------------------------------------------------------------------------- layer stacks

# What a rematerialised layer keeps for its backward pass (the rest is recomputed), lightest last.
# The named ones save tensors tagged with `checkpoint_name` in Attention and Mlp.
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # everything
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul output
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # weight matmuls' outputs
    "save_attention": _save("query_proj", "key_proj", "value_proj", "attention_context", "out_proj"),  # MLP recomputed
    "save_qkv": _save("query_proj", "key_proj", "value_proj"),  # attention and MLP recomputed
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
}


def make_stack(block_cls, num_layers, *, scan=False, remat="none", **block_kwargs):
    """`num_layers` copies of `block_cls`, to assign to a module attribute in `setup` and run with
    `apply_stack`.

    Unscanned, the attribute becomes named children `{attr}_{i}` (the released checkpoints'
    layout); scanned, one block `{attr}` whose parameters `apply_stack` gives a leading "layers"
    axis (40-64 layer towers compile in seconds). Blocks are called
    `block(x, cache, shared) -> (x, cache)`, where `cache` is the whole stack's `KVCache` (or None)
    pointed at the block's layer, and `shared` is a tuple given to every layer."""
    if remat != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return block_cls(**block_kwargs)
    return [block_cls(**block_kwargs) for _ in range(num_layers)]


def _scan_body(block, carry, layer, shared):
    x, cache = carry
    return block(x, None if cache is None else cache.at_layer(layer), shared), None


def apply_stack(stack, num_layers: int, x, cache=None, shared=()):
    """Runs a `make_stack` stack -> (x, cache). The cache is threaded through the layers (a scan
    carries it), so each layer's writes land in the stacked buffers in place."""
    if isinstance(stack, (list, tuple)):
        for i, block in enumerate(stack):
            x, cache = block(x, None if cache is None else cache.at_layer(i), shared)
        return x, cache
    scan = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(0, nn.broadcast), length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, cache), _ = scan(stack, (x, cache), jnp.arange(num_layers), shared)
    return x, cache


def unstack(params: dict, name: str, *, release: bool = False) -> dict:
    """A scanned `make_stack` stack's parameters ({name: leaves [num_layers, ...]}) in the unscanned
    stack's layout ({name_0: ..., name_1: ...}), the other entries as they are. Decoding runs
    unscanned: a scanned step slices each layer's weights out of the stack, a copy per layer and
    token on GPU (an H200 decoded a 1B LLaMA 1.8x faster at batch 1 and 2.1x at 16 unscanned).
    release: delete each stacked array once its layers are cut (for parameters nobody else holds:
    the cut-up tree then costs one leaf of extra memory, not a second tower)."""
    if name not in params:
        return params
    leaves, treedef = jax.tree.flatten(params[name])
    layers = [[] for _ in range(leaves[0].shape[0])]
    for leaf in leaves:
        cut = [leaf[i] for i in range(len(layers))]
        if release:
            jax.block_until_ready(cut)
            leaf.delete()
        for layer, piece in zip(layers, cut):
            layer.append(piece)
    unstacked = {key: value for key, value in params.items() if key != name}
    unstacked.update({f"{name}_{i}": jax.tree.unflatten(treedef, layer) for i, layer in enumerate(layers)})
    return unstacked

"""The conditional latent-diffusion UNet (diffusers' `UNet2DConditionModel`), channels-last.

    timestep -> sinusoid -> time_embedding (+ add_embedding of [pooled context, sinusoids of
    the SDXL micro-conditioning time ids] when `addition_time_embed_dim` > 0)
    latents -> conv_in -> down_blocks [resnets (+ spatial transformers), 2x downsample]
            -> mid_block [resnet, transformer, resnet]
            -> up_blocks [resnets over (x, skip) concatenations (+ transformers), 2x upsample]
            -> norm, SiLU, conv_out -> predicted noise

A spatial transformer is group norm -> proj_in (1x1 conv, or linear for SDXL) -> blocks of
[self-attention, cross-attention to the conditioning, GEGLU feed-forward] -> proj_out -> residual.
Emu conditions on its visual embeddings in place of CLIP text states: 32x5120 into an SD1.5-shaped
UNet (Emu1), 64x1792 plus their mean as the pooled "text_time" input into an SDXL-shaped one (Emu2).

Parameter names are diffusers' keys with the dot before an index turned into an underscore
(`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` ->
`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel`); the GEGLU projection
`ff.net.0.proj` is `ff/net_0_proj`. The VAE is built from the same blocks.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from emu_jax.models.layers import Attention, Mlp, conv, dense, group_norm, layer_norm


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: norm -> SiLU -> conv1 (+ projected time embedding) -> norm ->
    SiLU -> conv2, plus a 1x1 `conv_shortcut` on the residual when the channel count changes."""
    features: int
    groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, time_embedding=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_act = lambda name, y: nn.silu(group_norm(self.groups, self.epsilon, name=name, **kw)(y))  # noqa: E731
        h = conv(self.features, name="conv1", **kw)(norm_act("norm1", x))
        if time_embedding is not None:
            h = h + dense(self.features, ("embed", "conv_out"), name="time_emb_proj", use_bias=True,
                          **kw)(nn.silu(time_embedding))[:, None, None, :]
        h = conv(self.features, name="conv2", **kw)(norm_act("norm2", h))
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="conv_shortcut", **kw)(x)
        return x + h


class Resample(nn.Module):
    """A 2x resolution change holding one conv (`downsamplers_0` / `upsamplers_0`): down is a
    stride-2 3x3 conv (the VAE pads only right and bottom by one pixel, the UNet every side);
    up is nearest-neighbour 2x, then a 3x3 conv."""
    features: int
    up: bool = False
    asymmetric: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(name="conv", dtype=self.dtype, param_dtype=self.param_dtype)
        if self.up:
            return conv(self.features, **kw)(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        if self.asymmetric:
            return conv(self.features, stride=2, padding=0, **kw)(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
        return conv(self.features, stride=2, padding=1, **kw)(x)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-norm self-attention, cross-attention, GEGLU."""
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attention = functools.partial(Attention, self.num_heads, self.head_dim, out_bias=True,
                                      names=("to_q", "to_k", "to_v", "to_out_0"), **kw)
        x = x + attention(name="attn1")(layer_norm(1e-5, name="norm1", **kw)(x))[0]
        x = x + attention(name="attn2")(layer_norm(1e-5, name="norm2", **kw)(x), context)[0]
        ff = Mlp(4 * x.shape[-1], activation="gelu", gated=True, fused_gate=True, use_bias=True,
                 names=("net_0_proj", "net_2"), name="ff", **kw)
        return x + ff(layer_norm(1e-5, name="norm3", **kw)(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel over a feature map, with a residual around it."""
    num_heads: int
    depth: int = 1
    linear_projection: bool = False
    groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        project = (lambda name: dense(c, ("embed", "mlp"), name=name, use_bias=True, **kw)) if self.linear_projection \
            else (lambda name: conv(c, 1, name=name, **kw))
        y = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        y = project("proj_in")(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = TransformerBlock(self.num_heads, c // self.num_heads, name=f"transformer_blocks_{i}", **kw)(y, context)
        return x + project("proj_out")(y.reshape(b, h, w, c))


class DownBlock(nn.Module):
    """`num_layers` resnets (each followed by `attention` when given), then an optional 2x
    downsample; returns the output and the skip tensors the matching up block consumes."""
    features: int
    num_layers: int
    resample: bool = True
    attention: Callable[..., nn.Module] | None = None  # called with name= to make one attention
    groups: int = 32
    epsilon: float = 1e-5
    asymmetric_downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, time_embedding=None, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for j in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, self.epsilon, name=f"resnets_{j}", **kw)(x, time_embedding)
            if self.attention is not None:
                x = self.attention(name=f"attentions_{j}")(x, context)
            skips.append(x)
        if self.resample:
            x = Resample(self.features, asymmetric=self.asymmetric_downsample, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`num_layers` resnets, each over the concatenation of the input and one skip tensor when
    skips are given (the UNet) or over the input alone (the VAE decoder), then an optional 2x
    upsample."""
    features: int
    num_layers: int
    resample: bool = True
    attention: Callable[..., nn.Module] | None = None
    groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, time_embedding=None, context=None, skips=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = list(skips or ())
        for j in range(self.num_layers):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock(self.features, self.groups, self.epsilon, name=f"resnets_{j}", **kw)(x, time_embedding)
            if self.attention is not None:
                x = self.attention(name=f"attentions_{j}")(x, context)
        if self.resample:
            x = Resample(self.features, up=True, name="upsamplers_0", **kw)(x)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""
    attention: Callable[..., nn.Module]
    groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, time_embedding=None, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(x.shape[-1], self.groups, self.epsilon, name="resnets_0", **kw)(x, time_embedding)
        x = self.attention(name="attentions_0")(x, context)
        return ResnetBlock(x.shape[-1], self.groups, self.epsilon, name="resnets_1", **kw)(x, time_embedding)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """diffusers' sinusoidal embedding: [sin, cos] (or [cos, sin]) of t * max_period^(-i / (half - shift))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(dense(self.features, ("embed", "mlp"), name="linear_1", **kw)(x))
        return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(x)


class UNet(nn.Module):
    """Configured per resolution level (outermost first): `block_out_channels`, whether the level
    has spatial transformers (`cross_attention`), their `transformer_depth` and `num_heads`.
    SD1.5: channels (320, 640, 1280, 1280), attention (T, T, T, F), 8 heads, conv projections.
    SDXL: (320, 640, 1280), attention (F, T, T), depth (1, 2, 10), heads (5, 10, 20), linear
    projections and the "text_time" addition embedding (`addition_time_embed_dim=256`)."""
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    cross_attention: Sequence[bool] = (True, True, True, False)
    transformer_depth: Sequence[int] = (1, 1, 1, 1)
    num_heads: Sequence[int] = (8, 8, 8, 8)
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    linear_projection: bool = False
    addition_time_embed_dim: int = 0  # > 0: SDXL's "text_time" added embedding
    groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _transformer(self, level: int):
        if not self.cross_attention[level]:
            return None
        return functools.partial(SpatialTransformer, self.num_heads[level], self.transformer_depth[level],
                                 self.linear_projection, self.groups, dtype=self.dtype, param_dtype=self.param_dtype)

    @nn.compact
    def __call__(self, latents, timesteps, context, pooled=None, time_ids=None):
        """latents [B, h, w, C], timesteps [B], context [B, S, D] -> predicted noise [B, h, w, C].
        With the addition embedding, `pooled` [B, D] and `time_ids` [B, 6] are required."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(groups=self.groups, epsilon=self.norm_eps, **kw)
        channels = self.block_out_channels
        sinusoid = timestep_embedding(jnp.broadcast_to(timesteps, latents.shape[:1]), channels[0],
                                      self.flip_sin_to_cos, self.freq_shift)
        embedding = TimestepEmbedding(4 * channels[0], name="time_embedding", **kw)(sinusoid)
        if self.addition_time_embed_dim:
            if pooled is None or time_ids is None:
                raise ValueError("this UNet has a text_time addition embedding: pass pooled and time_ids")
            time_embeds = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                             self.flip_sin_to_cos, self.freq_shift).reshape(latents.shape[0], -1)
            added = jnp.concatenate([pooled.astype(jnp.float32), time_embeds], axis=-1)
            embedding = embedding + TimestepEmbedding(4 * channels[0], name="add_embedding", **kw)(added)
        x = conv(channels[0], name="conv_in", **kw)(latents)
        skips = [x]
        last = len(channels) - 1
        for level, features in enumerate(channels):
            x, level_skips = DownBlock(features, self.layers_per_block, resample=level < last,
                                       attention=self._transformer(level), name=f"down_blocks_{level}",
                                       **block)(x, embedding, context)
            skips += level_skips
        mid_attention = functools.partial(SpatialTransformer, self.num_heads[-1], self.transformer_depth[-1],
                                          self.linear_projection, self.groups, **kw)
        x = MidBlock(mid_attention, name="mid_block", **block)(x, embedding, context)
        for i, level in enumerate(reversed(range(len(channels)))):
            count = self.layers_per_block + 1
            skips, level_skips = skips[:-count], skips[-count:]
            x = UpBlock(channels[level], count, resample=i < last, attention=self._transformer(level),
                        name=f"up_blocks_{i}", **block)(x, embedding, context, level_skips)
        x = nn.silu(group_norm(self.groups, self.norm_eps, name="conv_norm_out", **kw)(x))
        return conv(self.out_channels, name="conv_out", out_axis="latent", **kw)(x).astype(jnp.float32)

"""The latent-diffusion autoencoder (diffusers' `AutoencoderKL`), channels-last.

    image -> encoder [conv_in -> down_blocks (resnets, 2x downsample) -> mid_block (resnet,
             attention, resnet) -> norm, SiLU, conv_out] -> quant_conv -> (mean, log-variance)
    latent -> post_quant_conv -> decoder [conv_in -> mid_block -> up_blocks (resnets, 2x
             upsample) -> norm, SiLU, conv_out] -> image

Images are in [-1, 1]; the diffusion model sees `scaling_factor * latent` (0.18215 for SD1.5's VAE,
0.13025 for SDXL's). Parameter names are diffusers' keys with the dot before an index turned into
an underscore (`encoder.down_blocks.0.resnets.1.conv1.weight` -> `encoder/down_blocks_0/resnets_1/conv1/kernel`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from emu_jax.models.layers import Attention, conv, group_norm
from emu_jax.models.unet import DownBlock, MidBlock, UpBlock


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: group norm, one head over all H*W positions with biased
    q, k, v and output projections, residual."""
    num_channels: int
    groups: int = 32
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.group_norm = group_norm(self.groups, self.epsilon, name=None, **kw)
        self.attention = Attention(1, self.num_channels, qkv_bias=True, out_bias=True,
                                   names=("to_q", "to_k", "to_v", "to_out_0"), **kw)
        nn.share_scope(self, self.attention)  # diffusers keeps to_q... beside group_norm

    def __call__(self, x, context=None):
        del context  # self-attention only
        b, h, w, c = x.shape
        y, _ = self.attention(self.group_norm(x).reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


def _vae_attention(channels, groups, kw):
    return functools.partial(SpatialSelfAttention, channels, groups, 1e-6, **kw)


def _norm_act_conv(x, features, groups, *, dtype, param_dtype):
    x = nn.silu(group_norm(groups, 1e-6, name="conv_norm_out", dtype=dtype, param_dtype=param_dtype)(x))
    return conv(features, name="conv_out", out_axis="latent", dtype=dtype, param_dtype=param_dtype)(x)


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(groups=self.groups, epsilon=1e-6, **kw)
        x = conv(self.block_out_channels[0], name="conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x, _ = DownBlock(channels, self.layers_per_block, resample=i < last, asymmetric_downsample=True,
                             name=f"down_blocks_{i}", **block)(x)
        x = MidBlock(_vae_attention(self.block_out_channels[-1], self.groups, kw), name="mid_block", **block)(x)
        return _norm_act_conv(x, 2 * self.latent_channels, self.groups, **kw)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int = 3
    groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(groups=self.groups, epsilon=1e-6, **kw)
        x = conv(self.block_out_channels[-1], name="conv_in", **kw)(z)
        x = MidBlock(_vae_attention(self.block_out_channels[-1], self.groups, kw), name="mid_block", **block)(x)
        channels = list(reversed(self.block_out_channels))
        for i, features in enumerate(channels):
            x = UpBlock(features, self.layers_per_block + 1, resample=i < len(channels) - 1, name=f"up_blocks_{i}",
                        **block)(x)
        return _norm_act_conv(x, self.out_channels, self.groups, **kw)


class AutoencoderKL(nn.Module):
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    groups: int = 32
    scaling_factor: float = 0.18215
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels, self.groups, **kw)
        self.quant_conv = conv(2 * self.latent_channels, 1, out_axis="latent", **kw)
        self.post_quant_conv = conv(self.latent_channels, 1, out_axis="latent", **kw)
        self.decoder = Decoder(self.block_out_channels, self.layers_per_block, 3, self.groups, **kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images):
        """images [B, H, W, 3] in [-1, 1] -> (mean, log-variance), each [B, H/f, W/f, latent]."""
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Unscaled latents -> images in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

    def __call__(self, images, rng=None):
        """Reconstruction (a posterior sample when `rng` is given, else the mean) and the
        posterior's (mean, log-variance) for the KL term."""
        mean, logvar = self.encode(images)
        return self.decode(posterior_sample(mean, logvar, rng)), (mean, logvar)


def posterior_sample(mean, logvar, rng=None):
    """A draw from N(mean, exp(logvar)), or the mean when `rng` is None."""
    return mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, per example."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))

"""Emu's visual decoder: visual embeddings -> pixels through latent diffusion.

    image -> Emu's visual encoder (vit -> connector.encode) -> conditioning [B, n, D]
    conditioning (+ its mean as the pooled input, SDXL-shaped) -> UNet denoises VAE latents
    latents -> VAE decoder -> image

Trained as an autoencoder (Emu2's recipe): the encoder's embedding of an image conditions the
UNet, which learns to denoise that image's latents. At generation time the conditioning is the
LLM's regressed embeddings instead. The towers keep Emu's names (`vit`, `connector`), so
`train.init_from.vit=<emu checkpoint>` loads a trained encoder.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from emu_jax.models import families
from emu_jax.models.eva_vit import normalize
from emu_jax.models.unet import UNet
from emu_jax.models.vae import AutoencoderKL, posterior_sample


class VisualDecoder(nn.Module):
    vit: nn.Module
    connector: nn.Module
    vae: AutoencoderKL
    unet: UNet
    image_size: int  # the decoder's pixel resolution (the ViT resizes to its own)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.vae.downsample_factor
        return side, side, self.vae.latent_channels

    def condition(self, images: jax.Array) -> jax.Array:
        """uint8 images [B, S, S, 3] -> the visual encoder's embeddings [B, n, D] (the
        connector's regression targets: what Emu's LLM learns to predict)."""
        size = self.vit.image_size
        pixels = normalize(images)
        if pixels.shape[1] != size:
            pixels = jax.image.resize(pixels, (pixels.shape[0], size, size, 3), "bicubic")
        return self.condition_pixels(pixels)

    def condition_pixels(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels at the ViT's size -> embeddings (Emu2-Gen's autoencoding negative is
        the embedding of all-zero normalised pixels, i.e. the dataset-mean image)."""
        return self.connector.encode(self.vit(pixels))[1]

    def to_latents(self, images: jax.Array, rng=None) -> jax.Array:
        """uint8 images -> scaled latents (the posterior mean, or a sample when `rng` is given)."""
        return posterior_sample(*self.vae.encode(to_signed(images)), rng) * self.vae.scaling_factor

    def from_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents -> images in [-1, 1]."""
        return self.vae.decode(latents / self.vae.scaling_factor)

    def eps(self, latents, timesteps, context) -> jax.Array:
        """The UNet's noise prediction; SDXL-shaped UNets also get the mean embedding as the pooled
        input and micro-conditioning ids (original size, crop (0, 0), target size: Emu2-Gen's
        defaults, 1024 px at full size, all the decoder's pixel size)."""
        extra = {}
        if self.unet.addition_time_embed_dim:
            side = float(self.image_size)
            ids = jnp.array([side, side, 0.0, 0.0, side, side], jnp.float32)
            extra = dict(pooled=context.mean(axis=1), time_ids=jnp.broadcast_to(ids, (latents.shape[0], 6)))
        return self.unet(latents, timesteps, context, **extra)

    def __call__(self, images, timesteps):
        """Touches every tower once (for initialisation): noise prediction for `images`' latents."""
        reconstruction, _ = self.vae(to_signed(images))
        return self.eps(self.to_latents(images), timesteps, self.condition(images)), reconstruction


def to_signed(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8, in the released pipelines' order: x / 2 + 0.5, clip to [0, 1], x 255, round."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def build_decoder(model_config) -> VisualDecoder:
    """The decoder described by `config.model` (Emu's `vit`/`connector` plus `vae`, `unet`, `decoder`)."""
    emu = families.of(model_config).build(model_config)  # the encoder towers exactly as in the model
    common = dict(dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.dtype(model_config.param_dtype))
    vae = AutoencoderKL(**model_config.vae.to_dict(), **common, parent=None)
    unet = UNet(**model_config.unet.to_dict(), **common, parent=None)
    vit = emu.vit.clone(parent=None)
    connector = emu.connector.clone(parent=None)
    return VisualDecoder(vit, connector, vae, unet, model_config.decoder.image_size)


def example_inputs(model: VisualDecoder, batch: int = 1) -> dict:
    size = model.image_size
    return dict(images=jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
                timesteps=jax.ShapeDtypeStruct((batch,), jnp.int32))



# convolutional: its FLOPs are not counted (no MFU is logged for the decoder's stages)
FAMILY = families.Family(build=build_decoder, example_inputs=example_inputs,
                         layouts=("emu2_gen", "diffusers_unet", "diffusers_vae"))

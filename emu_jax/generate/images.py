"""Pixels from visual embeddings: the decoder's sampler, jitted end to end.

    conditioning [B, n, D] (+ unconditional [B, n, D]) -> initial latents -> sampler loop over the
    UNet (classifier-free guidance in one doubled batch) -> VAE decode -> images [B, S, S, 3]

The released pipelines, step for step (tests/test_release_pipeline.py): Emu2-Gen draws the latents
scaled by the Euler sampler's initial sigma and guides with 3.0; Emu1 draws them at sigma 1 for
PNDM and guides with 7.5. Both return (decoded / 2 + 0.5) clipped to [0, 1], rounded to uint8.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emu_jax.models import diffusion
from emu_jax.models.visual_decoder import to_uint8


def initial_noise(model, rng, batch: int) -> jax.Array:
    """Latents ~ N(0, I) [B, h, w, c] for `model` (a `VisualDecoder`)."""
    return jax.random.normal(rng, (batch,) + model.latent_shape)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "steps", "guidance"))
def sample_pixels(model, params, context, unconditional, noise, *, sampler: str = "euler", steps: int = 50,
                  guidance: float = 3.0):
    """Images in [-1, 1] from the initial latents `noise` [B, h, w, c] ~ N(0, I) (the sampler scales
    them by its initial sigma). `model` is a `VisualDecoder`; `guidance` 1.0 skips the
    unconditional pass."""
    if sampler not in diffusion.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(diffusion.SAMPLERS)}")

    def eps(x, t, ctx):
        return model.apply({"params": params}, x, jnp.broadcast_to(t, x.shape[:1]), ctx, method=lambda m, *a: m.eps(*a))

    if guidance == 1.0:
        eps_fn = functools.partial(eps, ctx=context)
    else:
        eps_fn = diffusion.guided(functools.partial(eps, ctx=jnp.concatenate([context, unconditional])), guidance)
    latents = diffusion.SAMPLERS[sampler](eps_fn, noise, diffusion.alphas_cumprod(), steps)
    return model.apply({"params": params}, latents, method=lambda m, z: m.from_latents(z))


def sample_images(model, params, context, unconditional, rng, **settings) -> jax.Array:
    """uint8 images [B, S, S, 3] from latents drawn with `rng` (settings as `sample_pixels`)."""
    noise = initial_noise(model, rng, context.shape[0])
    return to_uint8(sample_pixels(model, params, context, unconditional, noise, **settings))

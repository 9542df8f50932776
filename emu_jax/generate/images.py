"""Pixels from visual embeddings: the decoder's sampler, jitted end to end.

    conditioning [B, n, D] (+ unconditional [B, n, D]) -> noise -> sampler loop over the UNet
    (classifier-free guidance in one doubled batch) -> VAE decode -> uint8 [B, S, S, 3]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emu_jax.models import diffusion
from emu_jax.models.visual_decoder import to_uint8


@functools.partial(jax.jit, static_argnames=("model", "sampler", "steps", "guidance"))
def sample_images(model, params, context, unconditional, rng, *, sampler: str = "euler", steps: int = 50,
                  guidance: float = 3.0):
    """`model` is a `VisualDecoder`; `guidance` 1.0 skips the unconditional pass."""
    if sampler not in diffusion.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(diffusion.SAMPLERS)}")

    def eps(x, t, ctx):
        return model.apply({"params": params}, x, jnp.broadcast_to(t, x.shape[:1]), ctx, method=lambda m, *a: m.eps(*a))

    if guidance == 1.0:
        eps_fn = functools.partial(eps, ctx=context)
    else:
        eps_fn = diffusion.guided(functools.partial(eps, ctx=jnp.concatenate([context, unconditional])), guidance)
    noise = jax.random.normal(rng, (context.shape[0],) + model.latent_shape)
    latents = diffusion.SAMPLERS[sampler](eps_fn, noise, diffusion.alphas_cumprod(), steps)
    images = model.apply({"params": params}, latents, method=lambda m, z: m.from_latents(z))
    return to_uint8(images)

"""Noise schedule, training noise and samplers of latent diffusion, as pure functions.

Training (DDPM, epsilon prediction): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with a_t the cumulative
product of (1 - beta) over Stable Diffusion's "scaled linear" betas (sqrt-linear from 0.00085 to 0.012
over 1000 steps); the UNet predicts eps.

Sampling walks a decreasing list of training timesteps ("leading" spacing with offset 1, as the
SD1.5 and SDXL scheduler configs do) with a denoiser `eps_fn(x, t) -> eps`:
  DDIM (eta 0; Emu1's decoder is SD1.5-shaped): x_0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);
      x <- sqrt(a_prev) x_0 + sqrt(1 - a_prev) eps.
  Euler discrete (Emu2-Gen): in sigma form x = x_0 + sigma eps with sigma_t = sqrt((1 - a_t) / a_t);
      the UNet sees x / sqrt(sigma^2 + 1); x <- x + eps (sigma_next - sigma), ending at sigma 0.
  PNDM's PLMS steps (Emu1, SD1.5's scheduler: `skip_prk_steps`, no Runge-Kutta warm-up), diffusers'
      PNDMScheduler exactly: the transfer x <- sqrt(a_prev / a_t) x - (a_prev - a_t) e /
      (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev)) with e a linear multistep mix of the
      UNet's predictions (Adams-Bashforth orders 1..4); the first step is redone from its start with
      the mean of two predictions, so n steps cost n + 1 UNet calls.
Classifier-free guidance mixes conditional and unconditional predictions of one batched call.
The loops are `lax.fori_loop`s over precomputed schedules, so a whole sampler jits into one program.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_betas(beta_start: float = 0.00085, beta_end: float = 0.012,
                        steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    return np.cumprod(1.0 - scaled_linear_betas(beta_start, beta_end))


def add_noise(x0, noise, timesteps, cumprod) -> jax.Array:
    """The forward process at integer `timesteps` [B] for x0 [B, ...]."""
    a = jnp.asarray(cumprod, jnp.float32)[timesteps].reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def leading_timesteps(num_steps: int, offset: int = 1, train_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Decreasing timesteps, diffusers' "leading" spacing: k * (train_steps // num_steps) + offset."""
    if not 0 < num_steps <= train_steps:
        raise ValueError(f"sampler steps must be in 1..{train_steps}, got {num_steps}")
    ratio = train_steps // num_steps
    return (np.arange(num_steps) * ratio)[::-1].astype(np.int64) + offset


def ddim_sample(eps_fn: Callable, noise, cumprod, num_steps: int) -> jax.Array:
    """Deterministic DDIM from `noise` (x_T ~ N(0, I)); the last step lands on a_prev = a_0
    (`set_alpha_to_one=False`)."""
    timesteps = leading_timesteps(num_steps)
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    a_t = np.asarray(cumprod)[timesteps]
    prev = timesteps - ratio
    a_prev = np.where(prev >= 0, np.asarray(cumprod)[np.maximum(prev, 0)], cumprod[0])
    tables = [jnp.asarray(v, jnp.float32) for v in (a_t, a_prev)]
    ts = jnp.asarray(timesteps, jnp.int32)

    def step(i, x):
        a, a_next = tables[0][i], tables[1][i]
        eps = eps_fn(x, ts[i]).astype(jnp.float32)
        x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))


def euler_sigmas(cumprod, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas with a trailing 0) of diffusers' EulerDiscreteScheduler, leading spacing."""
    timesteps = leading_timesteps(num_steps)
    all_sigmas = np.sqrt((1.0 - np.asarray(cumprod)) / np.asarray(cumprod))
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    return timesteps, np.concatenate([sigmas, [0.0]])


def euler_sample(eps_fn: Callable, noise, cumprod, num_steps: int) -> jax.Array:
    """Euler discrete from `noise` ~ N(0, I), scaled by the initial sigma as diffusers does
    (sqrt(sigma_max^2 + 1) for leading spacing)."""
    timesteps, sigmas = euler_sigmas(cumprod, num_steps)
    sig = jnp.asarray(sigmas, jnp.float32)
    ts = jnp.asarray(timesteps, jnp.int32)

    def step(i, x):
        sigma = sig[i]
        eps = eps_fn(x / jnp.sqrt(sigma ** 2 + 1.0), ts[i]).astype(jnp.float32)
        return x + eps * (sig[i + 1] - sigma)

    init_sigma = float(np.sqrt(sigmas.max() ** 2 + 1.0))
    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32) * init_sigma)


# Adams-Bashforth weights on (newest, ..., oldest) prediction, by how many predictions are kept.
_MULTISTEP = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_HISTORY = 3  # past predictions a PLMS step mixes in


@dataclasses.dataclass(frozen=True)
class PlmsPlan:
    """One row per UNet call: the timestep fed, the transfer's (t, t_prev), the weights of the new
    prediction and of the kept ones (newest first), whether the new one is kept, and whether the
    step restarts from the first step's input."""
    fed: np.ndarray  # [calls] int
    alpha: np.ndarray  # [calls] a_t
    alpha_prev: np.ndarray  # [calls] a_prev (a_0 below timestep 0: set_alpha_to_one=False)
    weights: np.ndarray  # [calls, 1 + _HISTORY]
    keep: np.ndarray  # [calls] bool
    restart: np.ndarray  # [calls] bool


def plms_plan(num_steps: int, cumprod) -> PlmsPlan:
    """diffusers' PNDMScheduler(skip_prk_steps=True, leading spacing, offset 1), bookkeeping
    replayed once in numpy: the leading timesteps, the second-to-last repeated (the repeat is the
    second call of the first step)."""
    cumprod = np.asarray(cumprod)
    ratio = NUM_TRAIN_TIMESTEPS // num_steps
    leading = leading_timesteps(num_steps)[::-1]
    fed = np.concatenate([leading[:-1], leading[-2:-1], leading[-1:]])[::-1]
    kept, rows = [], []  # kept: call indices of the predictions kept, oldest first
    for call, t in enumerate(fed):
        t, prev = int(t), int(t) - ratio
        if call == 1:  # the first step again, from its start, with the mean of its two predictions
            t, prev = t + ratio, t
            weights = {call: 0.5, kept[-1]: 0.5}
        else:
            kept = kept[-_HISTORY:] + [call]
            weights = dict(zip(reversed(kept), _MULTISTEP[len(kept)]))
        slots = [call] + [c for c in reversed(kept) if c != call][:_HISTORY]
        rows.append((int(fed[call]), cumprod[t], cumprod[prev] if prev >= 0 else cumprod[0],
                     [weights.get(c, 0.0) for c in slots] + [0.0] * (1 + _HISTORY - len(slots)), call != 1, call == 1))
    fed_t, alpha, alpha_prev, weights, keep, restart = (np.asarray(column) for column in zip(*rows))
    return PlmsPlan(fed_t, alpha, alpha_prev, weights, keep, restart)


def pndm_sample(eps_fn: Callable, noise, cumprod, num_steps: int) -> jax.Array:
    """PLMS from `noise` ~ N(0, I) (PNDM's initial sigma is 1)."""
    plan = plms_plan(num_steps, cumprod)
    a, a_prev = plan.alpha, plan.alpha_prev
    scale_x = np.sqrt(a_prev / a)
    scale_eps = (a_prev - a) / (a * np.sqrt(1.0 - a_prev) + np.sqrt(a * (1.0 - a) * a_prev))
    table = {k: jnp.asarray(v, jnp.float32) for k, v in dict(scale_x=scale_x, scale_eps=scale_eps,
                                                              weights=plan.weights).items()}
    fed, keep, restart = (jnp.asarray(v) for v in (plan.fed.astype(np.int32), plan.keep, plan.restart))
    x = noise.astype(jnp.float32)

    def step(i, carry):
        x, start, history = carry  # history [_HISTORY, ...]: kept predictions, newest first
        eps = eps_fn(x, fed[i]).astype(jnp.float32)
        w = table["weights"][i]
        mixed = w[0] * eps + jnp.tensordot(w[1:], history, axes=1)
        base = jnp.where(restart[i], start, x)
        start = jnp.where(i == 0, x, start)
        history = jnp.where(keep[i], jnp.concatenate([eps[None], history[:-1]]), history)
        return table["scale_x"][i] * base - table["scale_eps"][i] * mixed, start, history

    history = jnp.zeros((_HISTORY,) + x.shape, jnp.float32)
    return jax.lax.fori_loop(0, len(plan.fed), step, (x, x, history))[0]


SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample, "pndm": pndm_sample}


def guided(eps_fn: Callable, scale: float) -> Callable:
    """Classifier-free guidance over a denoiser called on [conditional; unconditional] stacked on
    the batch axis: eps = eps_u + scale (eps_c - eps_u). `eps_fn(x2, t)` gets the doubled batch."""
    def guided_eps(x, t):
        eps_c, eps_u = jnp.split(eps_fn(jnp.concatenate([x, x]), t), 2)
        return eps_u + scale * (eps_c - eps_u)
    return guided_eps

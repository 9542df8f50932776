"""What the trainer trains: one task object per `config.task` bundles the model, its inputs, its
loss and what to evaluate. The trainer itself (mesh, shardings, optimizer, checkpoints, loop) is
shared by every task.

  emu      the autoregressive model: next-token cross-entropy + next-visual-embedding regression
  vae      the decoder's autoencoder on its own: L1 reconstruction + KL (the tiny decoder's first
           stage; real runs load a converted VAE instead)
  decoder  the diffusion UNet, conditioned on Emu's visual encoder output for the same image
           (Emu2's autoencoding recipe); the VAE and the encoder are frozen by the config

A task provides: `model`, `example_inputs()`, `batch_spec()`, `loss(params, batch, rng, norms, step)`,
`loss_norms(batch)`, `counters(batch)`, `dataset(split, worker_count)`, `metric_keys` and
`step_flops(abstract_params, frozen)`; and what its evaluators (`config.evals`, eval/evaluators.py)
ask of it: `tokenizer` (emu), `reconstruct(params, images)` (the decoder stages), `latents(params,
images)` (vae).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from emu_jax.data import pipeline
from emu_jax.data.tokenizer import load_tokenizer
from emu_jax.models import families
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.train import stages


class _Task:
    """The model of `family_name` (None: the config's `model.family`), built from `config.model`."""
    family_name = None

    def __init__(self, config):
        self.config = config
        self.family = families.get(self.family_name) if self.family_name else families.of(config.model)
        self.model = self.family.build(config.model)

    def example_inputs(self) -> dict:
        return self.family.example_inputs(self.model)

    def step_flops(self, abstract_params, frozen) -> float:
        """The family's model FLOPs of one step (0: not counted, no MFU logged)."""
        if self.family.train_flops is None:
            return 0.0
        data = self.config.data
        frozen_towers = frozenset(t for t, sub in frozen.items() if all(jax.tree.leaves(sub)))
        return self.family.train_flops(abstract_params, self.config.model, data.global_batch_size, data.seq_len,
                                       data.max_images, frozen_towers)


class EmuTask(_Task):
    name = "emu"
    metric_keys = ("loss", "text_loss", "regression_loss")

    def __init__(self, config):
        super().__init__(config)
        self._tokenizer = None

    def batch_spec(self) -> dict:
        """The global batch the pipeline yields, as ShapeDtypeStructs (for ahead-of-time compiles)."""
        data, size = self.config.data, self.config.model.vit.image_size
        b, t, n = data.global_batch_size, data.seq_len, data.max_images
        spec = {"tokens": ((b, t), np.int32), "positions": ((b, t), np.int32), "segment_ids": ((b, t), np.int32),
                "images": ((b, n, size, size, 3), np.uint8), "image_mask": ((b, n), np.bool_),
                "text_mask": ((b, t), np.float32), "regression_mask": ((b, t), np.float32),
                "events": ((b, len(pipeline.EVENTS)), np.int32)}
        return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}

    def loss(self, params, batch, rng, norms, step=None):
        """The loss weights at `step` follow `config.stages` (None `step`, the held-out loss: the last
        stage's)."""
        from emu_jax.train.losses import emu_loss
        weights = {name: stages.loss_weight(self.config.loss, self.config.stages, name, step)
                   for name in ("text_weight", "regression_weight")}
        # deterministic but for LoRA's dropout (models/lora.py) while training (held-out loss: no step)
        rngs = {} if step is None else {"dropout": rng}
        out = self.model.apply({"params": params}, **pipeline.model_inputs(batch), rngs=rngs)
        return emu_loss(out, batch, **weights, norms=norms)

    def loss_norms(self, batch):
        return batch["text_mask"].sum(), batch["regression_mask"].sum()

    def counters(self, batch) -> dict:
        return dict(tokens=(batch["segment_ids"] > 0).sum(), images=batch["image_mask"].sum(),
                    events=batch["events"].sum(0))

    def dataset(self, split: str = "train", worker_count=None):
        return pipeline.make_dataset(self.config.data, self.config.model, self.model.visual_tokens_per_image,
                                     split=split, worker_count=worker_count)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.data, self.config.model.tokens)
        return self._tokenizer


class _DecoderTask(_Task):
    """Shared by the VAE and UNet stages: one `VisualDecoder`, image batches."""
    family_name = "visual_decoder"

    def batch_spec(self) -> dict:
        b, size = self.config.data.global_batch_size, self.model.image_size
        return {"images": jax.ShapeDtypeStruct((b, size, size, 3), np.uint8),
                "valid": jax.ShapeDtypeStruct((b,), np.bool_),
                "events": jax.ShapeDtypeStruct((b, len(pipeline.EVENTS)), np.int32)}

    def loss_norms(self, batch):
        return batch["valid"].sum()

    def counters(self, batch) -> dict:
        return dict(images=batch["valid"].sum(), tokens=jnp.int32(0), events=batch["events"].sum(0))

    def dataset(self, split: str = "train", worker_count=None):
        return pipeline.make_image_dataset(self.config.data, self.model.image_size, split=split,
                                           worker_count=worker_count)

    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

class VaeTask(_DecoderTask):
    name = "vae"
    metric_keys = ("loss", "reconstruction_loss", "kl_loss")

    def loss(self, params, batch, rng, norms, step=None):
        del step
        from emu_jax.models.vae import kl_divergence
        from emu_jax.models.visual_decoder import to_signed
        images = to_signed(batch["images"])
        reconstruction, (mean, logvar) = self.model.apply({"params": params}, images, rng,
                                                          method=lambda m, x, r: m.vae(x, r))
        valid = batch["valid"].astype(jnp.float32)
        per_example_l1 = jnp.abs(reconstruction - images).mean(axis=(1, 2, 3))
        per_example_kl = kl_divergence(mean, logvar) / np.prod(images.shape[1:])
        norm = jnp.maximum(norms, 1)
        reconstruction_loss = (per_example_l1 * valid).sum() / norm
        kl = (per_example_kl * valid).sum() / norm
        total = reconstruction_loss + self.config.loss.kl_weight * kl
        return total, {"loss": total, "reconstruction_loss": reconstruction_loss, "kl_loss": kl}

    def reconstruct(self, params, images):
        return mesh_lib.to_host(self._reconstruct(params, jnp.asarray(images)))

    def latents(self, params, images: np.ndarray) -> np.ndarray:
        """The VAE's latent means of uint8 images."""
        return mesh_lib.to_host(self._latents(params, jnp.asarray(images)))

    @functools.cached_property
    def _latents(self):
        from emu_jax.models.visual_decoder import to_signed
        return jax.jit(lambda p, x: self.model.apply({"params": p}, to_signed(x),
                                                     method=lambda m, x: m.vae.encode(x)[0]))

    @functools.cached_property
    def _reconstruct(self):
        from emu_jax.models.visual_decoder import to_signed, to_uint8

        def run(params, images):
            out, _ = self.model.apply({"params": params}, to_signed(images), method=lambda m, x: m.vae(x))
            return to_uint8(out)
        return jax.jit(run)


class DiffusionTask(_DecoderTask):
    name = "decoder"
    metric_keys = ("loss", "diffusion_loss")

    def __init__(self, config):
        super().__init__(config)
        from emu_jax.models import diffusion
        self.cumprod = diffusion.alphas_cumprod()

    def unconditional(self, context):
        """The conditioning that classifier-free guidance contrasts with (`decoder.uncond`)."""
        if self.config.model.decoder.uncond != "zeros":
            raise ValueError(f"decoder.uncond {self.config.model.decoder.uncond!r}: only 'zeros' is built in; "
                             f"pass explicit unconditional embeddings to the generator for others")
        return jnp.zeros_like(context)

    def loss(self, params, batch, rng, norms, step=None):
        del step
        from emu_jax.models import diffusion
        noise_key, time_key, drop_key = jax.random.split(rng, 3)
        latents = jax.lax.stop_gradient(self._apply(params, lambda m, x: m.to_latents(x), batch["images"]))
        context = self._apply(params, lambda m, x: m.condition(x), batch["images"])
        b = latents.shape[0]
        drop = jax.random.uniform(drop_key, (b,)) < self.config.model.decoder.condition_dropout
        context = jnp.where(drop[:, None, None], self.unconditional(context), context)
        noise = jax.random.normal(noise_key, latents.shape)
        timesteps = jax.random.randint(time_key, (b,), 0, diffusion.NUM_TRAIN_TIMESTEPS)
        noisy = diffusion.add_noise(latents, noise, timesteps, self.cumprod)
        eps = self._apply(params, lambda m, x, t, c: m.eps(x, t, c), noisy, timesteps, context)
        per_example = jnp.square(eps - noise).mean(axis=(1, 2, 3))
        loss = (per_example * batch["valid"]).sum() / jnp.maximum(norms, 1)
        return loss, {"loss": loss, "diffusion_loss": loss}

    def generate(self, params, context, rng, *, steps=None, guidance=None, sampler=None):
        """Conditioning [B, n, D] -> uint8 images, the configured sampler jitted end to end."""
        from emu_jax.generate.images import sample_images
        dc = self.config.model.decoder
        return sample_images(self.model, params, context, self.unconditional(context), rng,
                             sampler=sampler or dc.sampler, steps=steps or dc.sampler_steps,
                             guidance=dc.guidance if guidance is None else guidance)

    def reconstruct(self, params, images):
        """Autoencoding through diffusion: encoder embedding -> sampled latents -> pixels."""
        context = self._condition(params, jnp.asarray(images))
        return mesh_lib.to_host(self.generate(params, context, jax.random.key(self.config.seed)))

    @functools.cached_property
    def _condition(self):
        return jax.jit(lambda params, images: self._apply(params, lambda m, x: m.condition(x), images))


TASKS = {task.name: task for task in (EmuTask, VaeTask, DiffusionTask)}  # config.task -> the task


def make_task(config):
    kind = config.get("task", "emu")
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; choose one of {sorted(TASKS)}")
    return TASKS[kind](config)

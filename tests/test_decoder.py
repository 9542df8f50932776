"""The visual decoder: VAE and UNet shapes and sizes, sampler math, training steps, the stage runs."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SMALL_DECODER, init_key, load_config, small_decoder_config

from emu_jax import config_lib
from emu_jax.models import diffusion
from emu_jax.models.unet import UNet
from emu_jax.models.vae import AutoencoderKL
from emu_jax.models.visual_decoder import to_signed


def count(module, *args, **kwargs) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_full_size_towers_have_diffusers_parameter_counts():
    """The published sizes: SD1.5 UNet 859,520,964; SDXL UNet 2,567,463,684; SD VAE 83,653,863.
    Any missing or extra block, shortcut, norm or projection changes these."""
    latents, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))
    assert count(UNet(**config_lib.sd15_unet()), latents, t, jnp.zeros((1, 77, 768))) == 859_520_964
    assert count(UNet(**config_lib.sdxl_unet()), latents, t, jnp.zeros((1, 77, 2048)), pooled=jnp.zeros((1, 1280)),
                 time_ids=jnp.zeros((1, 6))) == 2_567_463_684
    assert count(AutoencoderKL(**config_lib.vae()), jnp.zeros((1, 16, 16, 3))) == 83_653_863


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_tiny_unet_shapes_and_conditioning(shape):
    make = config_lib.sd15_unet if shape == "sd15" else config_lib.sdxl_unet
    unet = UNet(**make(block_out_channels=(32, 64), cross_attention=(True, True) if shape == "sdxl" else (True, False),
                       transformer_depth=(1, 2), num_heads=(2, 4), layers_per_block=1, groups=8,
                       **({"addition_time_embed_dim": 16} if shape == "sdxl" else {})))
    rng = np.random.RandomState(0)
    latents = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
    context = jnp.asarray(rng.randn(2, 5, 24), jnp.float32)
    extra = dict(pooled=context.mean(1), time_ids=jnp.ones((2, 6))) if shape == "sdxl" else {}
    params = jax.jit(lambda: unet.init(init_key(0), latents, jnp.zeros((2,)), context, **extra))()
    apply = jax.jit(unet.apply)
    eps = apply(params, latents, jnp.array([10, 900]), context, **extra)
    assert eps.shape == latents.shape and bool(jnp.isfinite(eps).all())
    other = apply(params, latents, jnp.array([10, 900]), context[::-1], **extra)
    assert not np.allclose(eps[0], other[0]), "the output must depend on the conditioning"
    if shape == "sdxl":
        with pytest.raises(ValueError, match="pooled and time_ids"):
            unet.apply(params, latents, jnp.zeros((2,)), context)


def test_vae_round_trip_on_a_real_photo_and_training_reduces_the_loss():
    from skimage import data as photos
    from PIL import Image
    photo = np.asarray(Image.fromarray(photos.astronaut()).resize((32, 32), Image.BICUBIC))[None]
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, groups=8)
    images = to_signed(jnp.asarray(photo))
    params = jax.jit(vae.init)(init_key(0), images)
    mean, logvar = vae.apply(params, images, method=vae.encode)
    assert mean.shape == logvar.shape == (1, 16, 16, 4)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        loss, grads = jax.value_and_grad(lambda p: jnp.abs(vae.apply(p, images)[0] - images).mean())(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    losses = [float(step(params, opt)[2])]
    for _ in range(150):
        params, opt, loss = step(params, opt)
    losses.append(float(loss))
    assert losses[1] < 0.5 * losses[0], losses
    reconstruction, _ = vae.apply(params, images)
    assert reconstruction.shape == images.shape


# ----------------------------------------------------------------------------- schedules and samplers

def test_training_schedule_matches_stable_diffusion():
    cumprod = diffusion.alphas_cumprod()
    betas = diffusion.scaled_linear_betas()
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    assert cumprod[-1] == pytest.approx(0.0047, abs=1e-4)  # SD's terminal signal level
    x0, noise = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    noisy = diffusion.add_noise(x0, noise, jnp.array([0, 999]), cumprod)
    np.testing.assert_allclose(noisy[1], np.sqrt(cumprod[999]) + 2 * np.sqrt(1 - cumprod[999]), rtol=1e-6)
    np.testing.assert_array_equal(diffusion.leading_timesteps(50)[:3], [981, 961, 941])
    assert diffusion.leading_timesteps(50)[-1] == 1


def oracle(x0, cumprod, sigma_form: bool):
    """A denoiser that knows the clean latent: it predicts exactly the noise in its input."""
    def eps(x, t):
        a = jnp.asarray(cumprod, jnp.float32)[t]
        if sigma_form:  # Euler feeds x / sqrt(sigma^2 + 1) = sqrt(a) (x0 + sigma eps)
            return (x / jnp.sqrt(a) - x0) / jnp.sqrt((1 - a) / a)
        return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_a_denoiser_that_predicts_the_true_noise_recovers_the_clean_latent(sampler):
    cumprod = diffusion.alphas_cumprod()
    x0 = jnp.asarray(np.random.RandomState(1).randn(2, 4, 4, 4), jnp.float32)
    noise = jnp.asarray(np.random.RandomState(2).randn(2, 4, 4, 4), jnp.float32)
    out = jax.jit(lambda n: diffusion.SAMPLERS[sampler](oracle(x0, cumprod, sampler == "euler"), n, cumprod, 20))(noise)
    if sampler == "euler":  # ends at sigma 0: the clean latent itself
        np.testing.assert_allclose(out, x0, atol=1e-3)
    else:  # DDIM keeps the oracle's noise fixed and ends at a_0 (set_alpha_to_one=False), in closed form
        a_T, a_0 = cumprod[diffusion.leading_timesteps(20)[0]], cumprod[0]
        eps = (noise - np.sqrt(a_T) * x0) / np.sqrt(1 - a_T)
        np.testing.assert_allclose(out, np.sqrt(a_0) * x0 + np.sqrt(1 - a_0) * eps, atol=1e-3)
    wrong = jax.jit(lambda n: diffusion.SAMPLERS[sampler](lambda x, t: jnp.zeros_like(x), n, cumprod, 20))(noise)
    assert float(jnp.abs(wrong - x0).mean()) > 0.5


def test_guidance_scale_one_is_the_conditional_prediction_and_scale_mixes_linearly():
    def eps_fn(x, t):  # conditional half of the batch predicts 1, unconditional half 3
        return jnp.concatenate([jnp.ones_like(x[:1]), 3 * jnp.ones_like(x[1:])]) * (1 + 0 * t)
    x = jnp.zeros((1, 2, 2, 4))
    np.testing.assert_allclose(diffusion.guided(eps_fn, 1.0)(x, 5), 1.0)
    np.testing.assert_allclose(diffusion.guided(eps_fn, 3.0)(x, 5), 3 + 3 * (1 - 3))


# ----------------------------------------------------------------------------- the decoder stages

def test_diffusion_training_step_reduces_the_loss_on_a_fixed_batch(data_dir):
    from emu_jax.data import pipeline
    from emu_jax.train.tasks import make_task
    config = small_decoder_config()
    with config.unlocked():
        config.data.data_dir = data_dir
        config.data.global_batch_size = 8
    task = make_task(config)
    batch = next(iter(pipeline.make_image_dataset(config.data, 32, worker_count=0)))
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), task.example_inputs())
    params = jax.jit(lambda k: task.model.init(k, **inputs)["params"])(init_key(0))
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    tx = optax.masked(optax.adam(2e-3), {k: k == "unet" for k in params})
    opt = tx.init(params)
    key = jax.random.key(3)  # the same noise and timesteps every step: a fixed regression problem

    @jax.jit
    def step(params, opt):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key, task.loss_norms(batch))
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    first = None
    for _ in range(30):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first, (first, float(loss))


@pytest.mark.slow
def test_decoder_stages_run_resume_with_ema_and_log_sample_grids(data_dir, tmp_path):
    """VAE stage, then the UNet stage initialised from it with an EMA; a second launch of the
    finished UNet run restores the EMA and has nothing left to do; the generation recipe's run
    (configs/tiny_gen.py) scores its held-out prompts through that decoder."""
    from absl import flags
    from emu_jax.train import trainer
    flags.FLAGS.mark_as_parsed()

    def stage(name, workdir, steps, **overrides):
        config = small_decoder_config(name)
        with config.unlocked():
            config.data.data_dir = data_dir
            config.data.global_batch_size = 8
            config.data.worker_count = 0
            config.train.steps = steps
            config.train.eval_every = steps
            config.train.eval_batches = 1
            config.evals.samples.every = steps
            config.evals.samples.count = 8  # the samples batch spans the 8 fake devices
            config.evals.digits.count = 8
            if "latents" in config.evals:
                config.evals.latents.count = 8
            else:  # the generation recipe's check of its decoder stage, on 8 held-out canvases
                config.evals.canvases = config_lib.evaluator("canvas_reconstructions", count=8)
            for key, value in overrides.items():
                config.train.init_from[key] = value
        return trainer.train(config, str(workdir))

    vae = stage("vae", tmp_path / "vae", 2)
    assert 0.0 <= vae["digits/recognisability"] <= 100.0 and vae["latents/latent_std"] > 0 and vae["step"] == 2
    decoder = stage("decoder", tmp_path / "decoder", 2, vae=str(tmp_path / "vae" / "checkpoints"))
    assert decoder["step"] == 2 and 0.0 <= decoder["canvases/crop_accuracy"] <= 100.0
    assert 0.0 <= decoder["canvases/in_box"] <= 100.0
    assert os.path.exists(tmp_path / "decoder" / "samples" / "samples_0000002.png")
    assert os.path.isdir(tmp_path / "decoder" / "checkpoints" / "2" / "ema")
    again = stage("decoder", tmp_path / "decoder", 2)
    assert again["digits/recognisability"] == decoder["digits/recognisability"]  # same EMA weights restored, same samples
    gen = gen_recipe_run(data_dir, tmp_path, decoder=str(tmp_path / "decoder" / "checkpoints"))
    assert gen["step"] == 2 and 0.0 <= gen["generation/crop_accuracy"] <= 100.0
    assert 0.0 <= gen["generation/subject_in_box"] <= 100.0
    assert len(list((tmp_path / "gen" / "evals" / "generation" / "2").glob("*.png"))) == 4  # drawn by the decoder


def gen_recipe_run(data_dir, tmp_path, decoder: str) -> dict:
    """configs/tiny_gen.py:lora for two steps on written digits_gen records, its encoder from the
    decoder stage, scored by the digits_generation task through that decoder."""
    from emu_jax.data import digits_gen, write
    from emu_jax.train import trainer
    jsonl = digits_gen.write(str(tmp_path / "gen_data"), "test")[0]
    write.convert("generation", jsonl, str(tmp_path / "gen_data" / "gen"))
    source = config_lib.source("array_record", str(tmp_path / "gen_data" / "gen-*.array_record"))
    config = config_lib.with_overrides(load_config("tiny_gen", "lora"), dict(
        SMALL_DECODER, **{"data.data_dir": data_dir, "data.worker_count": 0, "data.global_batch_size": 8,
                                    "train.steps": 2, "train.init_from.vit": decoder,
                                    "train.init_from.connector": "", "train.init_from.llm": "",
                                    "evals.generation.decoder": decoder, "evals.generation.task.limit": 2}))
    with config.unlocked():
        config.data.train_sources = config.data.eval_sources = {"gen": source}
    return trainer.train(config, str(tmp_path / "gen"))

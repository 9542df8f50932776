"""Image generation against the official pipelines: Emu2-Gen's `EmuVisualGeneration`
(Emu2/emu/diffusion.py) and Emu1's `EmuGenerationPipeline` (Emu1/models/pipeline.py), built from the
release's classes and diffusion configs at tiny sizes with every parameter random, their
`state_dict()` converted by our importer, the same prompt and initial latents on both sides:
our float pixels equal theirs. Also the samplers against diffusers' schedulers."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import official
import pytest
import reference_models as rm
import release_models as rel
from conftest import load_config

torch = pytest.importorskip("torch")

from emu_jax import config_lib  # noqa: E402
from emu_jax.data.tokenizer import Tokenizer  # noqa: E402
from emu_jax.generate import prompts  # noqa: E402
from emu_jax.generate.generator import Generator  # noqa: E402
from emu_jax.models import diffusion  # noqa: E402
from emu_jax.models.unet import UNet  # noqa: E402

# float32 on both sides. Regressed embeddings (values ~2.5): each of the 64 is fed back as the
# next input, and the random-weight LLM amplifies rounding differences along the image (observed:
# 3e-6 at the first, 5e-3 at the last for a 9-word prompt; 1e-4 for a 3-word one). Pixels in [0, 1]
# after the guided sampler and the VAE: observed within 2.3e-4 of the official float image. A
# wrong sampler setting, conditioning or negative is off by tenths (43 / 255 for 10 steps vs 50).
EMBEDDING_TOLERANCE = 1e-2
PIXEL_TOLERANCE = 5e-4
SCHEDULER_CONFIG = official.EMU2_DIFFUSION_CONFIG / "scheduler"
PIPELINE_STEPS = 10


# ----------------------------------------------------------------------------- samplers

def _toy_eps(weights):
    """A denoiser for both frameworks that depends on its input and timestep nonlinearly."""
    return (lambda x, t: torch.tanh(x * torch.tensor(weights)[None, :, None, None] + float(t) / 1000.0),
            lambda x, t: jnp.tanh(x * weights + t / 1000.0))


@pytest.mark.parametrize("scheduler,sampler", [("PNDMScheduler", "pndm"), ("EulerDiscreteScheduler", "euler")])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 50])
def test_sampler_trajectory_equals_diffusers_scheduler(scheduler, sampler, steps):
    """The release's scheduler config (Emu2-Gen's; Emu1's SD1.5 PNDM config has the same betas,
    `steps_offset` 1, `skip_prk_steps`, `set_alpha_to_one` False) run by diffusers' scheduler
    class: the PLMS warm-up (the first step redone with two predictions), the multistep orders and
    the final alpha, or Euler's sigmas and initial scale, step for step."""
    import diffusers
    cls = getattr(diffusers, scheduler)
    reference = cls.from_config(cls.load_config(SCHEDULER_CONFIG))
    reference.set_timesteps(steps)
    eps_torch, eps_jax = _toy_eps(np.random.RandomState(0).randn(4).astype(np.float32))
    noise = np.random.RandomState(1).randn(1, 4, 4, 4).astype(np.float32)
    x = torch.tensor(noise) * reference.init_noise_sigma
    for t in reference.timesteps:
        x = reference.step(eps_torch(reference.scale_model_input(x, t), t), t, x).prev_sample
    ours = jax.jit(lambda z: diffusion.SAMPLERS[sampler](eps_jax, z, diffusion.alphas_cumprod(), steps))(
        jnp.asarray(noise.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(ours, x.numpy().transpose(0, 2, 3, 1), atol=5e-5)


def test_released_decoder_configs_are_the_releases():
    """configs/emu2_gen.py's decoder read against the release's diffusion_config and the
    official pipelines' defaults (steps, guidance, size); Emu1's against its pipeline's defaults."""
    import inspect
    import diffusers
    gen = load_config("emu2_gen").model
    unet = diffusers.UNet2DConditionModel.load_config(official.EMU2_DIFFUSION_CONFIG / "unet")
    assert tuple(unet["block_out_channels"]) == gen.unet.block_out_channels
    assert tuple(unet["transformer_layers_per_block"]) == gen.unet.transformer_depth
    assert tuple(unet["attention_head_dim"]) == gen.unet.num_heads  # diffusers' name for the head count
    assert tuple(t.startswith("CrossAttn") for t in unet["down_block_types"]) == gen.unet.cross_attention
    assert (unet["addition_time_embed_dim"], unet["use_linear_projection"], unet["layers_per_block"],
            unet["norm_num_groups"], unet["norm_eps"], unet["flip_sin_to_cos"], unet["freq_shift"]) == (
        gen.unet.addition_time_embed_dim, gen.unet.linear_projection, gen.unet.layers_per_block, gen.unet.groups,
        gen.unet.norm_eps, gen.unet.flip_sin_to_cos, gen.unet.freq_shift)
    assert unet["cross_attention_dim"] == load_config("emu2_37b").model.vit.width
    with torch.device("meta"):  # the whole UNet, counted without memory
        released_count = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(unet).parameters())
    width = unet["cross_attention_dim"]
    shapes = jax.eval_shape(lambda: UNet(**gen.unet).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 64, width)),
        pooled=jnp.zeros((1, width)), time_ids=jnp.zeros((1, 6))))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == released_count == 2_525_520_644
    vae = diffusers.AutoencoderKL.load_config(official.EMU2_DIFFUSION_CONFIG / "vae")
    assert (tuple(vae["block_out_channels"]), vae["layers_per_block"], vae["latent_channels"], vae["norm_num_groups"],
            vae["scaling_factor"]) == (gen.vae.block_out_channels, gen.vae.layers_per_block, gen.vae.latent_channels,
                                       gen.vae.groups, gen.vae.scaling_factor)
    scheduler = diffusers.EulerDiscreteScheduler.load_config(SCHEDULER_CONFIG)
    betas = diffusion.scaled_linear_betas()
    assert (scheduler["_class_name"], scheduler["timestep_spacing"], scheduler["steps_offset"]) == (
        "EulerDiscreteScheduler", "leading", 1) and gen.decoder.sampler == "euler"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == pytest.approx((betas[0], betas[-1]))
    assert official.emu1("pipeline").PNDMScheduler is diffusers.PNDMScheduler  # Emu1's sampler class
    assert config_lib.emu1_decoder().decoder.sampler == "pndm"
    for pipeline, decoder in ((official.emu2("diffusion").EmuVisualGeneration, gen.decoder),
                              (official.emu1("pipeline").EmuGenerationPipeline, config_lib.emu1_decoder().decoder)):
        defaults = inspect.signature(pipeline.forward).parameters
        assert (defaults["num_inference_steps"].default, defaults["guidance_scale"].default,
                defaults["height"].default) == (decoder.sampler_steps, decoder.guidance, decoder.image_size)


# ----------------------------------------------------------------------------- the tiny official pipelines

def _diffusers_from_release(cls, name, **shrink):
    """A diffusers model from the release's `diffusion_config/<name>` with the sizes shrunk."""
    return cls.from_config(cls.load_config(official.EMU2_DIFFUSION_CONFIG / name) | shrink)


def _generator(config, params, tokenizer_dir):
    tokenizer = Tokenizer(str(tokenizer_dir / "tokenizer.model"), config.model.tokens)
    return Generator(config, {k: params[k] for k in ("vit", "connector", "llm")}, tokenizer,
                     decoder_params={k: params[k] for k in ("unet", "vae")})


def emu2_gen_config(steps: int):
    """The tiny official Emu2 (release_models) with configs/tiny_decoder.py's UNet and VAE in the
    release's diffusion_config layout (SDXL's: no attention at the top level, scaling 0.13025) and
    Emu2-Gen's sampling (Euler, guidance 3.0, autoencoding)."""
    config = rel.tiny_release_config("emu2_37b")
    decoder = load_config("tiny_decoder", "decoder").model
    with config.unlocked():
        config.model.unet = decoder.unet
        config.model.unet.update(cross_attention=(False, True), transformer_depth=(1, 2), num_heads=(2, 4))
        config.model.vae = decoder.vae
        config.model.vae.scaling_factor = 0.13025
        config.model.decoder = config_lib.decoder_options(image_size=32, sampler="euler", sampler_steps=steps,
                                                          guidance=3.0, autoencode=True)
    return config


@pytest.fixture(scope="module")
def emu2_gen():
    return build_emu2_gen(PIPELINE_STEPS)


def build_emu2_gen(steps: int):
    """(official EmuVisualGeneration, our Generator sampling `steps` steps) on the same random
    weights: the official tiny EmuModel as multimodal encoder, diffusers' UNet, VAE and Euler
    scheduler from the release's diffusion_config (sizes shrunk), no safety checker; its
    state_dict through our `emu2_gen` layout. (benchmarks/t2i_vs_official.py builds it too.)"""
    import diffusers
    config = emu2_gen_config(steps)
    m = config.model
    u, v = m.unet, m.vae
    unet = _diffusers_from_release(
        diffusers.UNet2DConditionModel, "unet", block_out_channels=list(u.block_out_channels),
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=list(u.num_heads), transformer_layers_per_block=list(u.transformer_depth),
        layers_per_block=u.layers_per_block, norm_num_groups=u.groups, cross_attention_dim=m.vit.width,
        addition_time_embed_dim=u.addition_time_embed_dim,
        projection_class_embeddings_input_dim=m.vit.width + 6 * u.addition_time_embed_dim)
    vae = _diffusers_from_release(
        diffusers.AutoencoderKL, "vae", block_out_channels=list(v.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * len(v.block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.groups)
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(SCHEDULER_CONFIG)
    encoder = copy.deepcopy(rel.official_emu2()[0])
    pipeline = official.emu2("diffusion").EmuVisualGeneration(
        encoder, scheduler, rm._randomise(unet, 11), rm._randomise(vae, 12), feature_extractor=None,
        safety_checker=None, eva_size=m.vit.image_size)
    params = rel.ours(pipeline.state_dict(), "emu2_gen", config)  # the state_dict the release loads strictly
    return pipeline, _generator(config, params, official.EMU2_LLAMA_CONFIG)


def emu1_config():
    """The tiny official Emu1 (release_models) with an SD1.5-shaped UNet and VAE, Emu1's sampling
    (PNDM, guidance 7.5 against the regression for an empty prompt)."""
    config = rel.tiny_release_config("emu1_14b")
    with config.unlocked():
        config.model.unet = config_lib.sd15_unet(block_out_channels=(32, 64), cross_attention=(True, False),
                                                 transformer_depth=(1, 1), num_heads=(4, 4), layers_per_block=1,
                                                 groups=8)
        config.model.vae = config_lib.vae(block_out_channels=(16, 32, 32), layers_per_block=1, groups=8)
        config.model.decoder = config_lib.decoder_options(image_size=32, sampler="pndm", sampler_steps=PIPELINE_STEPS,
                                                          guidance=7.5)
    return config


@pytest.fixture(scope="module")
def emu1_pipeline(tmp_path_factory):
    """(official EmuGenerationPipeline, our Generator). The release's constructor loads each part
    with from_pretrained from its directory: we save tiny random ones there (the scheduler: PNDM
    with SD1.5's config, whose fields the release's Emu2 scheduler config repeats), and hand it the
    tiny official Emu (its `prepare_emu` reads a 14B json from ./models and a 14B checkpoint)."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    config = emu1_config()
    m = config.model
    root = tmp_path_factory.mktemp("emu1_pipeline")
    unet = rm._randomise(rm.unet(m.unet, m.llm.hidden), 21)
    vae = rm._randomise(rm.vae(m.vae), 22)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    diffusers.PNDMScheduler.from_config(diffusers.PNDMScheduler.load_config(SCHEDULER_CONFIG)).save_pretrained(
        root / "scheduler")
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=16),
                                            projection_dim=8)).save_pretrained(root / "safety_checker")
    CLIPImageProcessor().save_pretrained(root / "feature_extractor")
    emu, state = rel.official_emu1()
    pipeline_cls = official.emu1("pipeline").EmuGenerationPipeline
    original = pipeline_cls.prepare_emu
    pipeline_cls.prepare_emu = lambda self, *a, **k: copy.deepcopy(emu)
    try:
        pipeline = pipeline_cls.from_pretrained(str(root), eva_size=m.vit.image_size)
    finally:
        pipeline_cls.prepare_emu = original
    pipeline.safety_checker = None  # a random checker may black images out; the release's is not part of decoding
    params = rel.ours(state, "emu1", config)  # the release ships the UNet and VAE as diffusers directories
    for tower, layout in ((unet, "diffusers_unet"), (vae, "diffusers_vae")):
        params |= rel.ours(tower.state_dict(), layout, config)
    return pipeline, _generator(config, params, official.EMU1_LLAMA_CONFIG)


def run_official(pipeline, inputs, size, seed, steps=PIPELINE_STEPS, **kwargs):
    """The official pipeline on `inputs`: (its float pixels [S, S, 3] in [0, 1], the conditioning
    it computed [2, n, D] (prompt; negative), its initial latents NHWC)."""
    captured = {}
    decode, encode = pipeline.decode_latents, pipeline._prepare_and_encode_inputs
    pipeline.decode_latents = lambda latents: captured.setdefault("pixels", decode(latents))
    pipeline._prepare_and_encode_inputs = lambda *a, **k: captured.setdefault("conditioning", encode(*a, **k))
    side = size // pipeline.vae_scale_factor
    torch.manual_seed(seed)
    noise = torch.randn(1, pipeline.unet.config.in_channels, side, side).permute(0, 2, 3, 1).numpy()
    torch.manual_seed(seed)  # the pipeline's own torch.randn draws the same latents
    try:
        pipeline(inputs, height=size, width=size, num_inference_steps=steps, **kwargs)
    finally:
        del pipeline.decode_latents, pipeline._prepare_and_encode_inputs
    return captured["pixels"][0], captured["conditioning"].numpy(), noise


def assert_pixels_match(ours_uint8, reference):
    """Our uint8 image is the official float image, rounded, within PIXEL_TOLERANCE."""
    error = np.abs(ours_uint8.astype(np.float64) - reference.astype(np.float64) * 255).max()
    assert error <= 0.5 + 255 * PIXEL_TOLERANCE, error
    assert reference.std() > 0.01, "a flat image would hide mistakes"


@pytest.mark.slow
def test_emu2_gen_text_to_image_equals_official_pipeline(emu2_gen):
    """Regression of the 4 (tiny) embeddings through the LLM, negative = the regression for an
    empty prompt, SDXL conditioning (cross-attention states, their mean pooled, time ids), Euler 50
    steps, guidance 3.0, VAE decode."""
    pipeline, ours = emu2_gen
    size, text = ours.config.model.decoder.image_size, "an astronaut riding a horse on mars"
    pixels, conditioning, noise = run_official(pipeline, [text], size, seed=3, original_size=[size, size])
    out = ours.generate([prompts.parse(text + "[IMG]", size)], noise=noise)[0]
    np.testing.assert_allclose(out.embeddings[0], conditioning[0], atol=EMBEDDING_TOLERANCE)
    np.testing.assert_allclose(ours.unconditional(), conditioning[1], atol=EMBEDDING_TOLERANCE)
    assert_pixels_match(out.images[0], pixels)


@pytest.mark.slow
def test_emu2_gen_autoencoding_equals_official_pipeline(emu2_gen):
    """An image alone is Emu2-Gen's autoencoding mode: the encoder's pooled embeddings, guided
    against those of an all-zero normalised image (not an LLM regression)."""
    from PIL import Image
    pipeline, ours = emu2_gen
    size = ours.config.model.decoder.image_size
    photo = _photo(ours.config.model.vit.image_size)  # both sides read it at the encoder's size, unresized
    pixels, conditioning, noise = run_official(pipeline, [Image.fromarray(photo)], size, seed=4,
                                               original_size=[size, size])
    out = ours.generate([[prompts.ImageInput(photo), prompts.ImageRequest()]], noise=noise)[0]
    np.testing.assert_allclose(out.embeddings[0], conditioning[0], atol=EMBEDDING_TOLERANCE)
    assert_pixels_match(out.images[0], pixels)


def _photo(size):
    from PIL import Image
    from skimage import data as photos
    return np.asarray(Image.fromarray(photos.astronaut()).resize((size, size), Image.BICUBIC))


@pytest.mark.slow
def test_emu2_gen_text_and_image_prompt_equals_official_pipeline(emu2_gen):
    """Text around an image: the release splices the image's 64 embeddings (through project_up)
    into `[IMG] <image> x 64 [/IMG]` and regresses after the text; the negative is still the
    empty prompt's."""
    from PIL import Image
    pipeline, ours = emu2_gen
    size, photo = ours.config.model.decoder.image_size, _photo(ours.config.model.vit.image_size)
    pixels, conditioning, noise = run_official(pipeline, ["a cat like ", Image.fromarray(photo), " but red"], size,
                                               seed=6, original_size=[size, size])
    out = ours.generate([prompts.parse("a cat like <image> but red[IMG]", size, [photo])], noise=noise)[0]
    np.testing.assert_allclose(out.embeddings[0], conditioning[0], atol=EMBEDDING_TOLERANCE)
    assert_pixels_match(out.images[0], pixels)


@pytest.mark.slow
def test_emu1_text_to_image_equals_official_pipeline(emu1_pipeline):
    """Emu1: the 32 (tiny: 4) regressed embeddings fed back as they are, the empty prompt's
    regression as the negative (the release batches it beside the prompt, right-padded), an
    SD1.5-shaped UNet without pooled input, PNDM 50 steps, guidance 7.5."""
    pipeline, ours = emu1_pipeline
    size = ours.config.model.decoder.image_size
    pixels, conditioning, noise = run_official(pipeline, ["a red cat"], size, seed=5)
    out = ours.generate([prompts.parse("a red cat[IMG]", size)], noise=noise)[0]
    np.testing.assert_allclose(out.embeddings[0], conditioning[0], atol=EMBEDDING_TOLERANCE)
    np.testing.assert_allclose(ours.unconditional(), conditioning[1], atol=EMBEDDING_TOLERANCE)
    assert_pixels_match(out.images[0], pixels)


def test_a_batch_mixing_autoencoding_and_regression_is_refused(emu2_gen):
    """Rows of a batch advance together: an image alone (autoencoded) beside a text prompt
    (regressed) would silently be regressed; it is an error naming the row."""
    _, ours = emu2_gen
    photo = _photo(ours.config.model.vit.image_size)
    batch = [prompts.parse("a red cat[IMG]", 32), [prompts.ImageInput(photo), prompts.ImageRequest()]]
    with pytest.raises(prompts.PromptError, match="prompt 1 and prompt 0 differ in kind"):
        ours.generate(batch)

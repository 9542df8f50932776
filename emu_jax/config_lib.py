"""Pieces the experiment configs in `configs/` are assembled from.

A config is a locked `ml_collections.ConfigDict`, so a typo in `--config.a.b=...` fails instead of
being ignored. Sections: `model` (towers, tokens, dtypes), `mesh` (axis sizes and the one table
mapping logical axis names to mesh axes), `loss`. The released towers are below so that the
experiment files only state what differs.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from emu_jax import tokens as tokens_lib
from emu_jax.data import augment
from emu_jax.data.digits import VERSION as DIGITS_VERSION
from emu_jax.models import lora as lora_lib


def eva_clip_g(**overrides) -> ml_collections.ConfigDict:
    """EVA-01-CLIP-g/14, Emu1's encoder: 224 px, 257 tokens, width 1408, 40 pre-norm blocks."""
    return ml_collections.ConfigDict(dict(
        image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_hidden=6144,
        post_norm=False, norm_eps=1e-6, pos_embed_grid=0, scan_layers=True, remat="none") | overrides)


def eva_clip_e_plus(**overrides) -> ml_collections.ConfigDict:
    """EVA-02-CLIP-E/14+, Emu2's encoder: 448 px, 1025 tokens, width 1792, 64 post-norm blocks."""
    return ml_collections.ConfigDict(dict(
        image_size=448, patch_size=14, width=1792, depth=64, num_heads=16, mlp_hidden=15360,
        post_norm=True, norm_eps=1e-6, pos_embed_grid=0, scan_layers=True, remat="none") | overrides)


def causal_former(**overrides) -> ml_collections.ConfigDict:
    """Emu1's T5-base-shaped Causal Transformer with 32 learned queries."""
    return ml_collections.ConfigDict(dict(
        kind="causal_former", num_queries=32, ln_visual_eps=1e-6, d_model=768, num_layers=12, num_heads=12,
        head_dim=64, d_ff=3072, num_buckets=32, max_distance=128, norm_eps=1e-6, scan_layers=False,
        remat="none") | overrides)


def pooled_connector(pool_grid: int = 8, video_pool_grid: int = 8) -> ml_collections.ConfigDict:
    """Emu2's connector: pool the patch grid to pool_grid x pool_grid (video frames to
    video_pool_grid x video_pool_grid), project_up."""
    return ml_collections.ConfigDict(dict(kind="pooled", pool_grid=pool_grid, video_pool_grid=video_pool_grid))


def llama(size: str, vocab_size: int, **overrides) -> ml_collections.ConfigDict:
    """The LLaMA-1 shapes Emu builds on."""
    shapes = {"13b": dict(hidden=5120, num_layers=40, num_heads=40, mlp_hidden=13824),
              "33b": dict(hidden=6656, num_layers=60, num_heads=52, mlp_hidden=17920)}
    return ml_collections.ConfigDict(dict(
        vocab_size=vocab_size, **shapes[size], num_kv_heads=0, head_dim=0, norm_eps=1e-6, rope_theta=10000.0,
        max_positions=2048, scan_layers=True, remat="none") | overrides)


# Logical axis name -> mesh axes. Weights shard over fsdp (and tensor for heads/mlp/vocab); batch
# activations over data x fsdp. The only place the models' axis names meet the mesh.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("patch_height", None),
    ("patch_width", None),
    ("channels", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("latent", None),
)


def vae(**overrides) -> ml_collections.ConfigDict:
    """diffusers' AutoencoderKL: SD1.5's (scaling 0.18215); SDXL's differs only in scaling 0.13025."""
    return ml_collections.ConfigDict(dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                          latent_channels=4, groups=32, scaling_factor=0.18215) | overrides)


def sd15_unet(**overrides) -> ml_collections.ConfigDict:
    """Stable Diffusion 1.5's UNet (Emu1's decoder, cross-attending to 32 x 5120 embeddings)."""
    return ml_collections.ConfigDict(dict(
        block_out_channels=(320, 640, 1280, 1280), cross_attention=(True, True, True, False),
        transformer_depth=(1, 1, 1, 1), num_heads=(8, 8, 8, 8), layers_per_block=2, in_channels=4, out_channels=4,
        linear_projection=False, addition_time_embed_dim=0, groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0.0) | overrides)


def sdxl_unet(**overrides) -> ml_collections.ConfigDict:
    """SDXL's UNet (Emu2-Gen's decoder: 64 x 1792 embeddings, their mean as the pooled input)."""
    return sd15_unet(**(dict(block_out_channels=(320, 640, 1280), cross_attention=(False, True, True),
                             transformer_depth=(1, 2, 10), num_heads=(5, 10, 20), linear_projection=True,
                             addition_time_embed_dim=256) | overrides))


def decoder_options(**overrides) -> ml_collections.ConfigDict:
    """How the decoder is trained and sampled: pixel size, conditioning dropout (for guidance),
    the unconditional input, sampler ("euler" | "ddim" | "pndm"), steps, guidance scale, and
    `autoencode`: an image alone as the prompt is redrawn from its encoder embeddings (Emu2-Gen's
    autoencoding mode, guided against an all-zero normalised image) instead of regressed.
    The releases: Emu2-Gen euler 50 / 3.0 / autoencode; Emu1 pndm 50 / 7.5 at 512 px."""
    return ml_collections.ConfigDict(dict(image_size=1024, condition_dropout=0.1, uncond="zeros", sampler="euler",
                                          sampler_steps=50, guidance=3.0, autoencode=False) | overrides)


def emu2_gen_decoder() -> ml_collections.ConfigDict:
    """Emu2-Gen's visual decoder (`Emu2/emu/conf/diffusion_config`, `EmuVisualGeneration.forward`):
    SDXL's UNet and VAE (scaling 0.13025), 1024 px, Euler 50 steps, guidance 3.0, autoencoding."""
    return ml_collections.ConfigDict(dict(
        unet=sdxl_unet(), vae=vae(scaling_factor=0.13025),
        decoder=decoder_options(image_size=1024, sampler="euler", sampler_steps=50, guidance=3.0, autoencode=True)))


def emu1_decoder() -> ml_collections.ConfigDict:
    """Emu1's visual decoder (`EmuGenerationPipeline.forward`): SD1.5's UNet and VAE, 512 px, PNDM
    50 steps, guidance 7.5."""
    return ml_collections.ConfigDict(dict(
        unet=sd15_unet(), vae=vae(),
        decoder=decoder_options(image_size=512, sampler="pndm", sampler_steps=50, guidance=7.5)))


def generation_config(**overrides) -> ml_collections.ConfigDict:
    """Inference settings (`python -m emu_jax.generate`). Text: strategy "greedy" | "sample" |
    "beam" and the knobs of `emu_jax.generate.decoding.TextSettings`; `interleave`: a batch of one
    may answer with images of its own (text that emits [IMG] gets the image regressed and decoded,
    then goes on). Images: `uncond` "empty_prompt" (the model's regression for `<s> [IMG]`, as the
    reference) or "zeros"; guidance, sampler and steps 0/"" take the decoder's (`model.decoder`).
    `unstack_layers`: decode a scanned LLaMA with its layers cut apart (`generator.unscanned_llm`):
    free from a checkpoint, one more copy of the LLM's weights over a training run's parameters
    (its evaluators) until the evaluation ends; False decodes the stack as it is (1.8-2.1x slower
    on an H200)."""
    return ml_collections.ConfigDict(dict(
        strategy="greedy", max_new_tokens=32, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, num_beams=5,
        length_penalty=-1.0, interleave=True, max_images=4, uncond="empty_prompt", guidance=0.0, sampler="",
        sampler_steps=0, batch_size=16, seed=0, unstack_layers=True) | overrides)


def base_config(*, vit, connector, llm, special_tokens) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The PRNG that draws the initial parameters. XLA compiles threefry's rounds separately for every
    # parameter shape (the tiny decoder's init: 47 s); "unsafe_rbg" uses XLA's RngBitGenerator
    # (18 s), deterministic for a given mesh (T5X's choice for TPU). "threefry2x32" gives the same
    # values on every mesh. Dropout and diffusion noise keep JAX's default.
    config.init_prng = "unsafe_rbg"
    config.model = ml_collections.ConfigDict(dict(
        family="emu",  # models/families.py
        vit=vit, connector=connector, llm=llm, tokens=special_tokens,
        dtype="float32", param_dtype="float32", attention_impl="auto",
        lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=""))))  # models/lora.py
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=LOGICAL_AXIS_RULES))
    config.loss = ml_collections.ConfigDict(dict(text_weight=1.0, regression_weight=1.0))
    config.stages = ml_collections.ConfigDict()  # name -> stage(...): train/stages.py
    config.data = data_config()
    config.optimizer = optimizer_config()
    config.train = train_config()
    config.evals = ml_collections.ConfigDict()  # name -> evaluator(...)
    config.generate = generation_config()
    config.distributed = distributed_config()
    return config


def distributed_config() -> ml_collections.ConfigDict:
    """Joining a multi-process run (training, sweeps): coordinator "host:port" with num_processes /
    process_id joins explicitly; auto=True lets JAX detect the cluster (Cloud TPU VM pods, SLURM, ...);
    the launch/ scripts set one or the other. heartbeat_timeout_seconds: how long a silent peer is
    waited for before the run ends (JAX's default)."""
    return ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0, cpu_collectives="",
                                          auto=False, heartbeat_timeout_seconds=100))


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """AdamW; `freeze` and `lr_multipliers` are regexes over parameter paths like
    `vit/blocks_3/attn/qkv/kernel`; `no_decay` selects parameters without weight decay. `train_only`
    (a regex): only those parameters train, and checkpoints hold only them (the others come back from
    `train.init_from` or the seeded initialisation): LoRA sets it to the adapters."""
    return ml_collections.ConfigDict(dict(
        learning_rate=3e-4, warmup_steps=1000, decay="cosine", end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05, clip_norm=1.0, no_decay=r"(norm|bias|scale|embedding|pos_embed|cls_token|causal_tokens)",
        freeze="", train_only="", lr_multipliers=()) | overrides)


def train_config(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=10000, grad_accum_steps=1, nonfinite="skip", max_skipped_updates=100, max_consecutive_skipped=10,
        log_every=50, eval_every=1000, eval_batches=4,
        checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True,
        init_from=ml_collections.ConfigDict(dict(vit="", connector="", llm="")),  # tower -> checkpoint dir
        profile=ml_collections.ConfigDict(dict(from_step=0, steps=3)),  # a trace of steps from_step.. (0: none)
        compilation_cache=True,  # compiled programs kept in <workdir>/compilation_cache for a resumed run
        ema_decay=0.0) | overrides)


def stage(from_step: int, freeze: str = "", loss=None) -> ml_collections.ConfigDict:
    """A `config.stages` entry (train/stages.py): from `from_step` on, parameters matching `freeze` stop
    training and the `loss` weights given replace the config's."""
    return ml_collections.ConfigDict(dict(from_step=from_step, freeze=freeze, loss=dict(loss or {})))


def evaluator(type: str, every: int = 0, final: bool = True, **options) -> ml_collections.ConfigDict:  # noqa: A002
    """A `config.evals` entry (eval/evaluators.py): run every `every` steps (0: never during training)
    and, with `final`, at the end of training (`--config.evals.<name>.final=False` turns one off)."""
    return ml_collections.ConfigDict(dict(type=type, every=every, final=final, **options))


def source(kind: str, path: str, split: str = "train", weight: float = 1.0) -> ml_collections.ConfigDict:
    """One data source: kind is "array_record" (path: a glob of shards), "tfds" (path: a prepared
    dataset directory), "webdataset" (tar shards: a glob, a brace range or wids' shard-list JSON),
    "webdataset_stream" (the same shards read front to back without an index: `data.stream`),
    "parquet" (a glob of Parquet files) or "digits" (path: where the embedded digits world is built)."""
    return ml_collections.ConfigDict(dict(kind=kind, path=path, split=split, weight=weight))


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Input pipeline settings; `{data_dir}` in paths expands to `data_dir`."""
    return ml_collections.ConfigDict(dict(
        data_dir="~/.cache/emu_jax/datasets",
        tokenizer="",  # sentencepiece model: LLaMA's tokenizer.model for the released configs
        train_sources=ml_collections.ConfigDict(), eval_sources=ml_collections.ConfigDict(),
        seq_len=2048, max_images=8, video_frames=8, global_batch_size=256, pack=True, packing_bins=16,
        seed=0, worker_count=2, worker_buffer_size=2, strict=False,
        chat_format="emu2_chat",  # conversation documents (segments with roles) are rendered so: emu_jax/chat.py
        augment=augment_config(),
        # streamed sources (webdataset_stream): shards each reader interleaves, and the window of
        # samples a training shuffle mixes (that many encoded documents held per reader)
        stream=ml_collections.ConfigDict(dict(open_shards=4, shuffle_window=1000)),
        # image batches (the visual decoder's stages) read only documents whose meta has these
        # values, e.g. {"view": 0}: the digits world's original images, not its fixed extra views
        image_documents_where=ml_collections.ConfigDict()) | overrides)


def augment_config(kind: str = "none", **affine) -> ml_collections.ConfigDict:
    """Training-time image augmentation (data/augment.py): `kind` names one, its options live
    under its name (so `--config.data.augment.kind=affine` switches it on with the defaults)."""
    defaults = dataclasses.asdict(augment.RandomAffine())
    return ml_collections.ConfigDict(dict(kind=kind, affine=ml_collections.ConfigDict(defaults | affine)))


def digits_data(**overrides) -> ml_collections.ConfigDict:
    """The embedded digits world (built on first use) and its own tokenizer."""
    return data_config(
        tokenizer="{data_dir}/digits_world/" + DIGITS_VERSION + "/tokenizer.model",
        train_sources=ml_collections.ConfigDict(dict(digits=source("digits", "{data_dir}", "train"))),
        eval_sources=ml_collections.ConfigDict(dict(digits=source("digits", "{data_dir}", "test"))),
        **overrides)


def emu1_config(*, instruct: bool = False) -> ml_collections.ConfigDict:
    special, vocab = tokens_lib.emu1_tokens(instruct=instruct)
    return base_config(vit=eva_clip_g(), connector=causal_former(), llm=llama("13b", vocab), special_tokens=special)


def emu2_config(*, chat: bool = False) -> ml_collections.ConfigDict:
    special, vocab = tokens_lib.emu2_tokens(chat=chat)
    return base_config(vit=eva_clip_e_plus(), connector=pooled_connector(16 if chat else 8),
                       llm=llama("33b", vocab), special_tokens=special)


# Emu-I's adapters (Emu1/inference.py: LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, q/k/v/o))
ATTENTION_LORA = dict(rank=16, alpha=16.0, dropout=0.05, targets=r"^llm/.*/self_attn/(q_proj|k_proj|v_proj|o_proj)$")
FINE_TUNING = {  # recipe: (LoRA adapters or None, learning rate)
    "lora": (ATTENTION_LORA, 2e-4),
    "full": (None, 1e-5),
}


def fine_tune(config: ml_collections.ConfigDict, recipe: str, sources: dict, *, loss: tuple[float, float],
              chat_format: str = "emu2_chat", freeze: str = r"^vit/", steps: int = 5000,
              global_batch_size: int = 64) -> ml_collections.ConfigDict:
    """A released model's config turned into a fine-tuning recipe, in place: `sources` {name: (glob under
    {data_dir}, weight)} of records written by `python -m emu_jax.data.write`, LLaMA's tokenizer, loss
    weights (text, regression), and `recipe` "lora" (Emu-I's adapters; they alone train, checkpoints
    hold them alone, the frozen base is held in bf16) or "full" (all but `freeze`: the visual encoder,
    as Emu2's chat and generation tuning keep it). The released weights come in through
    `--config.train.init_from.<tower>=<a conversion's checkpoints>`."""
    lora, learning_rate = FINE_TUNING[recipe]
    config.model.vit.remat = config.model.llm.remat = "dots_no_batch"
    config.data.tokenizer = "{data_dir}/llama/tokenizer.model"
    config.data.train_sources = ml_collections.ConfigDict(
        {name: source("array_record", path, weight=weight) for name, (path, weight) in sources.items()})
    config.data.chat_format = chat_format
    config.data.global_batch_size = global_batch_size
    config.loss.text_weight, config.loss.regression_weight = loss
    config.mesh.fsdp, config.mesh.data = -1, 1
    config.optimizer = optimizer_config(learning_rate=learning_rate, warmup_steps=min(200, steps // 10),
                                        weight_decay=0.0 if lora else 0.05,
                                        train_only=lora_lib.ADAPTERS if lora else "", freeze="" if lora else freeze)
    if lora:  # the frozen base in bf16 (the adapters stay float32: models/lora.py)
        config.model.lora.update(lora)
        config.model.param_dtype = "bfloat16"
    config.train.steps = steps
    return config


def parse_variant(arg: str | None, allowed: tuple[str, ...]) -> str:
    """`configs/x.py:variant` -> variant, with a clear error for an unknown one."""
    variant = arg or allowed[0]
    if variant not in allowed:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(allowed)}")
    return variant


def load(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> its get_config(arg), as `--config=` would load it (for tests
    and notebooks; the CLIs use ml_collections' config_flags)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_emu_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-path overrides applied ({"mesh.fsdp": -1, ...}), as the
    `--config.a.b=value` flags would; an unknown key is an error naming it."""
    import copy
    variant = copy.deepcopy(config)
    with variant.unlocked():
        for key, value in overrides.items():
            parent, _, leaf = key.rpartition(".")
            node = variant
            for part in filter(None, parent.split(".")):
                node = node[part]
            if leaf not in node:
                raise KeyError(f"config override {key!r}: the config has no {leaf!r} under {parent or 'the root'!r}")
            node[leaf] = value
    return variant

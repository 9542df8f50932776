"""The official Emu release's own classes (`tests/official.py`) at tiny sizes, every parameter random,
and the state dicts they save: what users' released files hold, key for key.

    official_emu1(config, instruct=False, seed)  Emu1 `Emu` (Emu-I: its LLM wrapped in peft LoRA r 16
                                                 on q/k/v/o, as `Emu1/inference.py` does)
    official_emu2(config, chat=False, seed)      Emu2 `EmuModel` (Emu2-Chat: instruct tokens, n_query 256)
    official_emu2_gen(config, seed)              the `EmuVisualGeneration` file: `multimodal_encoder` (an
                                                 EmuModel), diffusers' `unet` / `vae`, `safety_checker`
each return (official torch module in eval mode, float32, its `state_dict()`), cached per session.
`official_forward(...)` runs the official pieces on one interleaved input (ViT, connector, logits,
regression head) and `ours(...)` imports a release state dict with our converter. Shapes come from
our config (`tiny_release_config`): the release configs of configs/emu1_14b.py and emu2_*.py with
small widths, so every constant (norm eps, rope base, buckets, pooling) is the release config's.

The release builds its LLaMA from a `llama_config` directory: we copy the release's (tokenizer
included, so vocabularies and added tokens are the release's) and shrink `config.json`. Emu1 reads
it from `./models/llama_config` (relative to the working directory), and its Causal Transformer asks
the Hub for `t5-base`'s config, answered here by a local T5Config of t5-base's constants at tiny size.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import tempfile

import numpy as np
import official
import reference_models as rm
import torch

from emu_jax import config_lib
from emu_jax.convert import importer, tensors

T5_BASE = dict(vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj="relu", dropout_rate=0.1, is_encoder_decoder=True)
EMU1_EMBED_DIM = 1024  # Emu-14B.json: the EVA head's width (a head Emu never calls)
LORA = dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05,
            bias="none", task_type="CAUSAL_LM")  # Emu1/inference.py
TINY_VIT = dict(patch_size=4, width=64, depth=2, num_heads=4, mlp_hidden=256, scan_layers=False)
TINY_LLM = dict(hidden=64, num_layers=2, num_heads=4, mlp_hidden=128, scan_layers=False)


def tiny_release_config(name: str, **llm):
    """configs/<name>.py shrunk: `emu1_14b[:instruct]`, `emu2_37b`, `emu2_chat`; float32."""
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name.split(':')[0]}.py")
                             + (f":{name.split(':')[1]}" if ":" in name else ""))
    with config.unlocked():
        emu1 = config.model.connector.kind == "causal_former"
        config.model.vit.update(TINY_VIT, image_size=32 if emu1 else 128)
        config.model.llm.update(TINY_LLM, **llm)
        if emu1:
            config.model.connector.update(num_queries=4, d_model=32, num_layers=2, num_heads=4, head_dim=8, d_ff=64)
        config.model.dtype = "float32"
    return config


def _llama_dir(source, root: str, llm) -> str:
    """The release's llama_config directory copied under `root`, its config.json at our tiny shape."""
    target = os.path.join(root, "llama_config")
    shutil.copytree(source, target)
    with open(os.path.join(target, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=llm.hidden, intermediate_size=llm.mlp_hidden, num_hidden_layers=llm.num_layers,
               num_attention_heads=llm.num_heads, torch_dtype="float32")
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(cfg, f)
    return target


@contextlib.contextmanager
def _working_directory(path: str):
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


@contextlib.contextmanager
def _local_t5_base(c):
    """`T5Config.from_pretrained("t5-base")` answered with t5-base's constants at our connector's size."""
    from transformers import T5Config
    original = T5Config.from_pretrained
    tiny = dict(T5_BASE, d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.num_layers,
                num_decoder_layers=c.num_layers, num_heads=c.num_heads)
    T5Config.from_pretrained = classmethod(lambda cls, name, **kw: cls(**tiny))
    try:
        yield
    finally:
        T5Config.from_pretrained = original


def _float32(model: torch.nn.Module) -> torch.nn.Module:
    """Float32 weights and rotary tables (Emu1 casts its LLM and connector to bf16 at construction,
    the LLaMA's inv_freq buffer included)."""
    model.float()
    for module in model.modules():
        if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
            inv_freq, _ = module.rope_init_fn(module.config, None)
            module.inv_freq = inv_freq.float()
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = module.inv_freq
    return model


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def official_emu1(config_name: str = "emu1_14b", instruct: bool = False, seed: int = 0):
    """(official Emu1 `Emu`, its state_dict) at the shape of tiny_release_config(config_name)."""
    import types
    config = tiny_release_config(config_name + (":instruct" if instruct else ""))
    m = config.model
    modeling_emu = official.emu1("modeling_emu")
    vision_cfg = dict(image_size=m.vit.image_size, layers=m.vit.depth, width=m.vit.width,
                      head_width=m.vit.width // m.vit.num_heads, mlp_ratio=m.vit.mlp_hidden / m.vit.width,
                      patch_size=m.vit.patch_size, eva_model_name="eva-clip-g-14-x", drop_path_rate=0, xattn=True)
    args = types.SimpleNamespace(instruct=instruct, device=torch.device("cpu"))
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "models"))
        _llama_dir(official.EMU1_LLAMA_CONFIG, os.path.join(root, "models"), m.llm)
        with _working_directory(root), _local_t5_base(m.connector):
            model = modeling_emu.Emu(embed_dim=EMU1_EMBED_DIM, multimodal_cfg=dict(name="llama-13B", n_causal=32),
                                     vision_cfg=vision_cfg, vladapter_cfg=dict(name="cformer",
                                                                             n_causal=m.connector.num_queries),
                                     cast_dtype=torch.float, args=args)
    if instruct:
        from peft import LoraConfig, get_peft_model
        model.decoder.lm = get_peft_model(model.decoder.lm, LoraConfig(**LORA))
    model = rm._randomise(_float32(model), seed)  # LoRA B too: a zero B would hide an unmerged adapter
    return model, _state(model)


@functools.cache
def official_emu2(config_name: str = "emu2_37b", chat: bool = False, seed: int = 0):
    """(official Emu2 `EmuModel`, its state_dict); chat: Emu2-Chat (instruct tokens, 16x16 pooling)."""
    config = tiny_release_config("emu2_chat" if chat else config_name)
    m = config.model
    emu, conf = official.emu2("emu"), official.emu2("conf.emu_conf")
    grid = m.connector.pool_grid
    vision_cfg = conf.CLIPVisionCfg(image_size=m.vit.image_size, patch_size=m.vit.patch_size, width=m.vit.width,
                                    layers=m.vit.depth, head_width=m.vit.width // m.vit.num_heads,
                                    mlp_ratio=m.vit.mlp_hidden / m.vit.width, n_query=grid * grid,
                                    v_query=64)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as root:
        path = _llama_dir(official.EMU2_LLAMA_CONFIG, root, m.llm)
        model = emu.EmuModel(vision_cfg=vision_cfg,
                             text_decoder_cfg=conf.TextDecoderCfg(llama_config_path=path, instruct=chat))
    model = rm._randomise(_float32(model), seed)
    return model, _state(model)


@functools.cache
def official_emu2_gen(seed: int = 0):
    """(official Emu2-Gen `EmuVisualGeneration`: multimodal_encoder an official EmuModel, diffusers'
    unet and vae at the tests' small decoder shape, a tiny CLIP safety checker; its state_dict)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    config = gen_config()
    encoder = copy.deepcopy(official_emu2(seed=seed)[0])
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPConfig(text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=16), projection_dim=8)
    model = official.emu2("diffusion").EmuVisualGeneration(
        multimodal_encoder=encoder, scheduler=EulerDiscreteScheduler(), feature_extractor=CLIPImageProcessor(),
        unet=rm.unet(config.model.unet, config.model.vit.width, seed + 1), vae=rm.vae(config.model.vae, seed + 2),
        safety_checker=rm._randomise(StableDiffusionSafetyChecker(clip), seed + 3))
    return model.eval(), _state(model)


def gen_config():
    """tiny_release_config("emu2_37b") with the tests' small UNet and VAE (conftest.SMALL_DECODER: the
    layouts of configs/tiny_decoder.py's at 8-16 channels; conversion needs names and shapes, not quality)."""
    from conftest import small_decoder_config
    config = tiny_release_config("emu2_37b")
    decoder = small_decoder_config()
    with config.unlocked():
        config.model.unet, config.model.vae = decoder.model.unet, decoder.model.vae
        config.model.decoder = decoder.model.decoder
    return config


# ----------------------------------------------------------------------------- one interleaved input

def interleaved_input(config, seed: int = 0, text: int = 5):
    """(tokens [2, T], uint8 images [2, 1, H, W, 3]): per row `<s> text [IMG] <image> x n [/IMG] text`."""
    m, rng = config.model, np.random.RandomState(seed)
    n = m.connector.num_queries if m.connector.kind == "causal_former" else m.connector.pool_grid ** 2
    t = m.tokens
    rows = [[1, *rng.randint(3, 32000, text), t.img, *[t.image] * n, t.img_end, *rng.randint(3, 32000, text)]
            for _ in range(2)]
    images = rng.randint(0, 256, (2, 1, m.vit.image_size, m.vit.image_size, 3)).astype(np.uint8)
    return np.array(rows), images


def _llama(decoder_lm):
    """The LlamaForCausalLM under Emu1-I's peft wrapper (LoRA layers in place), or itself."""
    return decoder_lm.get_base_model() if hasattr(decoder_lm, "get_base_model") else decoder_lm


@torch.no_grad()
def official_forward(model, tokens: np.ndarray, images: np.ndarray) -> dict:
    """The official pieces on one input: {vit, connector, logits, regression} as numpy.
    vit: all ViT tokens; connector: the LLM inputs at the `<image>` positions (Emu1: ln_visual +
    cformer; Emu2: pooled + project_up); logits and regression (stu_regress_head / project_down) of
    the final-normed hidden state at every position. uint8 images are normalised as the release's
    transforms do (ToTensor, then OPENAI_DATASET_MEAN / STD; Emu1/utils.py holds the same)."""
    constants = official.emu2("constants")
    pixels = (images.reshape((-1,) + images.shape[2:]) / np.float32(255.0) - np.float32(constants.OPENAI_DATASET_MEAN)
              ) / np.float32(constants.OPENAI_DATASET_STD)
    pixels = torch.tensor(pixels.astype(np.float32)).permute(0, 3, 1, 2)
    ids = torch.tensor(tokens)
    emu1 = hasattr(model, "cformer")
    if emu1:
        vit = model.visual.forward_features(pixels)
        connector = model.cformer(model.ln_visual(vit))
        lm = _llama(model.decoder.lm)
        head = lm.stu_regress_head
    else:
        vit = model.visual(pixels)
        connector = model.project_up(model.encode_image(pixels))
        lm, head = model.decoder.lm, model.project_down
    embeds = lm.model.embed_tokens(ids)
    embeds[ids == model.decoder.image_token_id] = connector.reshape(-1, connector.shape[-1])
    hidden = lm.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).last_hidden_state
    return {"vit": vit.numpy(), "connector": connector.numpy(), "logits": lm.lm_head(hidden).numpy(),
            "regression": head(hidden).numpy()}


def ours(state: dict, layout: str, config, **kwargs) -> dict:
    """Our params imported from a release state dict with our converter."""
    return importer.to_params(tensors.from_state_dict(state), layout, config, **kwargs)


def our_forward(config, params: dict, tokens: np.ndarray, images: np.ndarray) -> dict:
    """Our model on the same input (uint8 images: it normalises them itself), the same four outputs."""
    import jax.numpy as jnp
    from emu_jax.models.emu import build_model
    model = build_model(config.model)
    variables = {"params": params}
    flat = jnp.asarray(images.reshape((-1,) + images.shape[2:]))
    vit = model.apply(variables, flat, method="image_features")
    connector = model.apply(variables, jnp.asarray(images), method=lambda m, x: m.encode_images(x)[0])
    positions = np.tile(np.arange(tokens.shape[1]), (tokens.shape[0], 1))
    out = model.apply(variables, jnp.asarray(tokens), positions, np.ones_like(tokens), jnp.asarray(images))
    return {"vit": np.asarray(vit), "connector": np.asarray(connector).reshape(-1, connector.shape[-1]),
            "logits": np.asarray(out.logits), "regression": np.asarray(out.regression)}

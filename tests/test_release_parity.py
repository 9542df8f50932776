"""Conversion against the OFFICIAL release classes (tests/release_models.py): import a state dict
saved from the official Emu1 `Emu` (and Emu-I, peft-wrapped), Emu2 `EmuModel`, Emu2-Chat and
Emu2-Gen `EmuVisualGeneration`; our forward equals the official one; our export loads into the
official class with `strict=True`; every file type users have imports; every constant of our
release configs is the one the official code uses."""
import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import official  # noqa: E402
import release_models as rm  # noqa: E402
from conftest import load_config  # noqa: E402

from emu_jax import tokens as tokens_lib  # noqa: E402
from emu_jax.convert import exporter, importer, layouts, tensors  # noqa: E402

TOLERANCE = 1e-4
# name: (our release config, layout, builder(seed) -> (official model, state dict))
VARIANTS = {
    "emu1": ("emu1_14b", "emu1", lambda seed: rm.official_emu1(seed=seed)),
    "emu1_instruct": ("emu1_14b:instruct", "emu1_instruct", lambda seed: rm.official_emu1(instruct=True, seed=seed)),
    "emu2": ("emu2_37b", "emu2", lambda seed: rm.official_emu2(seed=seed)),
    "emu2_chat": ("emu2_chat", "emu2", lambda seed: rm.official_emu2(chat=True, seed=seed)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """(name, tiny config, layout, official model, its state dict)."""
    config_name, layout, build = VARIANTS[request.param]
    model, state = build(0)
    return request.param, rm.tiny_release_config(config_name), layout, model, state


def max_error(ours, reference):
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(reference, np.float32).reshape(ours.shape)).max())


def assert_same_outputs(ours: dict, official_outputs: dict):
    for name in ("vit", "connector", "logits", "regression"):
        assert max_error(ours[name], official_outputs[name]) <= TOLERANCE, name


def test_imported_release_matches_the_official_forward(variant):
    """ViT tokens, connector output, logits at every position and the regression head on one
    interleaved input (Emu-I: adapters merged; Emu2-Chat: 16x16 pooling)."""
    _, config, layout, model, state = variant
    tokens, images = rm.interleaved_input(config)
    ours = rm.our_forward(config, rm.ours(state, layout, config), tokens, images)
    assert_same_outputs(ours, rm.official_forward(model, tokens, images))


def test_lora_adapters_are_merged_with_alpha_over_r():
    """Emu-I's q/k/v/o weights are W + alpha/r B A; a different alpha (flag) changes exactly them."""
    config = rm.tiny_release_config("emu1_14b:instruct")
    _, state = rm.official_emu1(instruct=True)
    base = "decoder.lm.base_model.model.model.layers.1.self_attn.v_proj."
    a, b, w = (state[base + k].numpy() for k in ("lora_A.default.weight", "lora_B.default.weight",
                                                   "base_layer.weight"))
    for alpha in (16.0, 4.0):
        kernel = rm.ours(state, "emu1_instruct", config, lora_alpha=alpha if alpha != 16.0 else None)["llm"][
            "layers_1"]["self_attn"]["v_proj"]["kernel"]
        np.testing.assert_allclose(kernel.reshape(w.shape[1], -1).T, w + alpha / a.shape[0] * b @ a, atol=1e-6)


def _export(state, layout, config, tmp_path, name="export.safetensors"):
    summary = importer.import_checkpoint(tensors.from_state_dict(state), layout, config, str(tmp_path / "ours"),
                                         progress=False)
    out = str(tmp_path / name)
    exporter.export_checkpoint(summary["checkpoint"], layout, config, out, progress=False)
    return summary, out


def _strict_load(other, path):
    from safetensors.torch import load_file
    fresh = copy.deepcopy(other)
    fresh.load_state_dict(load_file(path), strict=True)  # raises on any missing or unexpected key
    return fresh.eval()


def test_export_loads_strictly_into_the_official_class_and_gives_the_same_outputs(variant, tmp_path):
    name, config, layout, model, state = variant
    summary, out = _export(state, layout, config, tmp_path)
    carried = [k for k in state if layouts.is_carried(layouts.get_layout(layout), k)]
    assert sorted(summary["carried"]) == sorted(carried)
    other = VARIANTS[name][2](1)[0]  # other weights: a load that did nothing would show
    tokens, images = rm.interleaved_input(config)
    expected = rm.official_forward(model, tokens, images)
    assert_same_outputs(rm.official_forward(_strict_load(other, out), tokens, images), expected)
    if carried:  # a checkpoint trained here carries none: the release's initial values fill them
        os.remove(os.path.join(summary["checkpoint"], "0", "meta", importer.CARRIED))
        exporter.export_checkpoint(summary["checkpoint"], layout, config, str(tmp_path / "filled.safetensors"),
                                   progress=False)
        assert_same_outputs(rm.official_forward(_strict_load(other, str(tmp_path / "filled.safetensors")),
                                                tokens, images), expected)


def test_emu2_gen_file_imports_and_exports_what_the_official_pipeline_loads(tmp_path):
    """Every tower of the file round-trips into a strict load of `EmuVisualGeneration` (the
    encoder's values are checked by the Emu2 forward above, the UNet/VAE by the diffusers tests);
    its safety checker is carried, and without the carried copy export refuses by name."""
    _, state = rm.official_emu2_gen()
    config = rm.gen_config()
    summary, out = _export(state, "emu2_gen", config, tmp_path)
    assert summary["carried"] == [k for k in state if k.startswith("safety_checker.")]
    assert summary["tensors"] == len(state) - len(summary["carried"])
    fresh = _strict_load(rm.official_emu2_gen(seed=1)[0], out)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    os.remove(os.path.join(summary["checkpoint"], "0", "meta", importer.CARRIED))
    with pytest.raises(Exception, match=r"needs keys matching \['\^safety_checker"):
        exporter.export_checkpoint(summary["checkpoint"], "emu2_gen", config, str(tmp_path / "x.safetensors"),
                                   progress=False)


# ----------------------------------------------------------------------------- a LoRA run's adapters, out

def _lora_run(tmp_path, variant: str, targets: str, rank: int = 8, alpha: float = 16.0):
    """(config with model.lora, base checkpoint dir, adapter checkpoint dir, base + adapters params):
    the official model's weights as the base and random adapters (B nonzero: a dropped or
    transposed adapter would show) saved as a LoRA run saves them (adapters alone)."""
    import flax.linen as nn
    import jax
    from model_helpers import save_params
    from emu_jax.models import lora as lora_lib
    from emu_jax.models.emu import build_model, example_inputs
    config_name, layout, build = VARIANTS[variant]
    config = rm.tiny_release_config(config_name)
    base = rm.ours(build(0)[1], layout, config)
    with config.unlocked():
        config.model.lora.update(rank=rank, alpha=alpha, dropout=0.05, targets=targets)
    model = build_model(config.model)
    abstract = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw)["params"], example_inputs(model))
    _, adapters = lora_lib.split(nn.unbox(abstract))
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), adapters)
    save_params(tmp_path / "base", base)
    save_params(tmp_path / "adapters", adapters)
    return config, str(tmp_path / "base"), str(tmp_path / "adapters"), lora_lib.join(base, adapters)


EMU_I_TARGETS = r"^llm/.*/self_attn/(q_proj|k_proj|v_proj|o_proj)$"


def test_emu_i_export_writes_a_lora_runs_adapters_unmerged_for_the_official_peft_wrapper(tmp_path):
    """Base + rank-8 adapters on q/k/v/o and the MLP's gate_proj -> an emu1_instruct file that the
    official Emu-I (peft r=16, alpha=16, as Emu1/inference.py builds it) loads strictly and whose
    forward is ours with the adapters: q/k/v/o's adapters unmerged (padded to rank 16, rescaled to
    alpha / r = 1), gate_proj's (the release wraps no MLP) merged. Importing the file again gives
    the merged model; rank 32 cannot fit the release's wrapper and is refused by name."""
    import jax
    from emu_jax.models import lora as lora_lib
    config, base_dir, adapter_dir, params = _lora_run(tmp_path, "emu1_instruct",
                                                      EMU_I_TARGETS[:-1] + r"|^llm/.*/mlp/gate_proj$")
    out = str(tmp_path / "emu_i.safetensors")
    exporter.export_checkpoint(base_dir, "emu1_instruct", config, out, progress=False, adapter_dir=adapter_dir)
    from safetensors.numpy import load_file
    written = load_file(out)
    q = "decoder.lm.base_model.model.model.layers.1.self_attn.q_proj."
    assert written[q + "lora_A.default.weight"].shape == (16, config.model.llm.hidden)
    assert np.abs(written[q + "lora_B.default.weight"]).max() > 0  # the trained adapter, not a zero one
    tokens, images = rm.interleaved_input(config)
    official = rm.official_forward(_strict_load(VARIANTS["emu1_instruct"][2](1)[0], out), tokens, images)
    assert_same_outputs(rm.our_forward(config, params, tokens, images), official)

    plain = copy.deepcopy(config)
    with plain.unlocked():
        plain.model.lora.rank = 0
    imported = importer.to_params(tensors.open_source(out), "emu1_instruct", plain)
    merged = lora_lib.merge(params, lora_lib.spec(config.model.lora))
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=2e-5), imported,
                 {tower: merged[tower] for tower in imported})

    config, base_dir, adapter_dir, _ = _lora_run(tmp_path / "r32", "emu1_instruct", EMU_I_TARGETS, rank=32)
    with pytest.raises(Exception, match="rank-32 adapters do not fit layout emu1_instruct's rank-16 peft wrapper"):
        exporter.export_checkpoint(base_dir, "emu1_instruct", config, str(tmp_path / "x.safetensors"),
                                   progress=False, adapter_dir=adapter_dir)


def test_peft_adapter_directory_loads_with_peft_onto_the_official_llm(tmp_path):
    """`convert export --peft`: adapter_config.json + adapter_model.safetensors that
    `PeftModel.from_pretrained(model.decoder.lm, dir)` loads onto the official Emu1 (its base
    weights our export) with no missing or unexpected adapter key, and the forward is ours with
    the adapters; adapters outside the LLM are refused by name."""
    from peft import PeftModel
    config, base_dir, adapter_dir, params = _lora_run(tmp_path, "emu1", EMU_I_TARGETS, rank=4, alpha=8.0)
    summary = exporter.export_peft(adapter_dir, config, str(tmp_path / "peft"))
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        written = json.load(f)
    assert (written["r"], written["lora_alpha"], written["target_modules"]) == (4, 8.0, ["k_proj", "o_proj", "q_proj",
                                                                                       "v_proj"])
    assert summary["tensors"] == 2 * 4 * config.model.llm.num_layers
    exporter.export_checkpoint(base_dir, "emu1", config, str(tmp_path / "base.safetensors"), progress=False)
    official = _strict_load(VARIANTS["emu1"][2](1)[0], str(tmp_path / "base.safetensors"))
    official.decoder.lm = PeftModel.from_pretrained(official.decoder.lm, str(tmp_path / "peft")).eval()
    loaded = {k for k in official.decoder.lm.state_dict() if "lora_" in k}
    assert len(loaded) == summary["tensors"]
    tokens, images = rm.interleaved_input(config)
    assert_same_outputs(rm.our_forward(config, params, tokens, images),
                        rm.official_forward(official, tokens, images))

    config, _, adapter_dir, _ = _lora_run(tmp_path / "vit", "emu1", EMU_I_TARGETS[:-1] + r"|^vit/.*/attn/qkv$")
    with pytest.raises(Exception, match=r"wraps the LLM \(LlamaForCausalLM\) alone, and this run also adapts "
                                        r"\['vit/blocks_0/attn/qkv'"):
        exporter.export_peft(adapter_dir, config, str(tmp_path / "refused"))


# ----------------------------------------------------------------------------- the files users have

def _write(kind: str, state: dict, directory) -> str:
    """The release state dict as a user's file: bf16 torch pickle (Emu1's under 'module'),
    safetensors, or shards with the Hugging Face index of either kind."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    if kind == "bf16_bin":
        path = os.path.join(directory, "pytorch_model.bf16.bin")
        torch.save({"module": {k: v.to(torch.bfloat16) for k, v in state.items()}}, path)
        return path
    if kind == "safetensors":
        path = os.path.join(directory, "model.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        return path
    keys = list(state)
    names = ["00001-of-00002", "00002-of-00002"]
    bin_index = kind == "bin_index"
    shard = {n: f"pytorch_model-{n}.bin" if bin_index else f"model-{n}.safetensors" for n in names}
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for n, part in halves.items():
        tensors_ = {k: state[k].contiguous() for k in part}
        path = os.path.join(directory, shard[n])
        torch.save(tensors_, path) if bin_index else save_file(tensors_, path)
    index = os.path.join(directory, "pytorch_model.bin.index.json" if bin_index else "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: shard[n] for n, part in halves.items() for k in part}}, f)
    return index


PUBLISHED = {"emu1": "bf16_bin", "emu1_instruct": "bf16_bin", "emu2": "bf16_bin", "emu2_chat": "safetensors_index"}


KINDS = ("bf16_bin", "safetensors", "safetensors_index", "bin_index")


@pytest.mark.parametrize("name,kind", [pytest.param(n, k, marks=() if PUBLISHED[n] == k else pytest.mark.slow)
                                       for n in VARIANTS for k in KINDS])
def test_every_layout_imports_from_every_file_type(name, kind, tmp_path):
    """Each layout from each file type (the kind it is published as in the fast suite)."""
    config_name, layout, build = VARIANTS[name]
    config, state = rm.tiny_release_config(config_name), build(0)[1]
    import jax
    if kind == "bf16_bin":
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    from_file = importer.to_params(tensors.open_source(_write(kind, state, tmp_path)), layout, config)
    in_memory = rm.ours(state, layout, config)
    for got, want in zip(jax.tree.leaves(from_file), jax.tree.leaves(in_memory)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_import_into_a_directory_with_trained_steps_is_refused(tmp_path):
    """Issue #20: step 0 beside trained steps was written and then never loaded by a resume."""
    config = rm.tiny_release_config("emu2_37b")
    _, state = rm.official_emu2()
    os.makedirs(tmp_path / "checkpoints" / "1500")
    with pytest.raises(FileExistsError, match=f"^{tmp_path}: checkpoints/ already holds 1500;"):
        importer.import_checkpoint(tensors.from_state_dict(state), "emu2", config, str(tmp_path), progress=False)
    assert os.listdir(tmp_path / "checkpoints") == ["1500"]


# ----------------------------------------------------------------------------- constants, read from the release

def _emu1_json():
    with open(official.RELEASE / "Emu1" / "models" / "Emu-14B.json") as f:
        return json.load(f)


def _llama_json(directory):
    from transformers import LlamaConfig
    with open(directory / "config.json") as f:
        return LlamaConfig(**json.load(f))


RELEASE_CONFIGS = {"emu1": ("emu1_14b", official.EMU1_LLAMA_CONFIG), "emu1_instruct": ("emu1_14b:instruct",
                                                                                          official.EMU1_LLAMA_CONFIG),
                   "emu2": ("emu2_37b", official.EMU2_LLAMA_CONFIG), "emu2_chat": ("emu2_chat", official.EMU2_LLAMA_CONFIG)}


def _full(name):
    spec = RELEASE_CONFIGS[name][0]
    return load_config(*spec.split(":"))


@pytest.mark.parametrize("name", list(RELEASE_CONFIGS))
def test_llama_constants_are_the_release_llama_config(name):
    llm, release = _full(name).model.llm, _llama_json(RELEASE_CONFIGS[name][1])
    assert (llm.hidden, llm.num_layers, llm.num_heads, llm.mlp_hidden) == (
        release.hidden_size, release.num_hidden_layers, release.num_attention_heads, release.intermediate_size)
    assert llm.num_kv_heads in (0, release.num_key_value_heads) and llm.norm_eps == release.rms_norm_eps
    assert llm.max_positions == release.max_position_embeddings
    rope = getattr(release, "rope_theta", None) or release.rope_parameters["rope_theta"]
    assert llm.rope_theta == rope


@pytest.mark.parametrize("name", list(RELEASE_CONFIGS))
def test_vocabulary_and_special_token_ids_are_the_official_tokenizer(name):
    """The official class adds its special tokens to the release tokenizer: the vocabulary it
    resizes to and every id our config names."""
    model = VARIANTS[name][2](0)[0]
    tokenizer = model.decoder.tokenizer
    config = _full(name)
    assert config.model.llm.vocab_size == len(tokenizer)
    for text, token_id in tokens_lib.text_forms(config.model.tokens).items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id, text


def test_emu_i_recipe_is_the_releases_lora_config():
    """configs/emu1_14b.py:instruct_lora's adapters are the LoraConfig Emu1/inference.py wraps Emu-I in
    (read from the file: r, lora_alpha, lora_dropout, target_modules); the export's wrapper too."""
    import re
    source = (official.RELEASE / "Emu1" / "inference.py").read_text()
    call = re.search(r"LoraConfig\((.*?)\)", source, re.S).group(1)
    value = lambda name: re.search(rf"\b{name}=([^,\n]+)", call).group(1)  # noqa: E731
    targets = re.findall(r"'(\w+)'", re.search(r"target_modules=\[(.*?)\]", call).group(1))
    lora = load_config("emu1_14b", "instruct_lora").model.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (int(value("r")), float(value("lora_alpha")),
                                                     float(value("lora_dropout")))
    assert lora.targets == rf"^llm/.*/self_attn/({'|'.join(targets)})$"
    wrapper = layouts.get_layout("emu1_instruct").lora
    assert (wrapper.rank, wrapper.alpha, wrapper.targets) == (lora.rank, lora.alpha, tuple(targets))


def test_emu1_vit_and_connector_constants():
    config, release = _full("emu1").model, _emu1_json()
    vision, model = release["vision_cfg"], rm.official_emu1()[0]
    assert (config.vit.image_size, config.vit.patch_size, config.vit.width, config.vit.depth) == (
        vision["image_size"], vision["patch_size"], vision["width"], vision["layers"])
    assert config.vit.num_heads == vision["width"] // vision["head_width"]
    assert config.vit.mlp_hidden == int(vision["width"] * vision["mlp_ratio"])  # the release's int(dim * ratio)
    block = model.visual.blocks[0]
    assert config.vit.norm_eps == block.norm1.eps == block.norm2.eps
    assert config.vit.post_norm == block.postnorm
    assert block.attn.scale == (model.visual.embed_dim // block.attn.num_heads) ** -0.5  # the default 1/sqrt(d)
    assert config.connector.ln_visual_eps == model.ln_visual.eps
    assert config.connector.num_queries == release["vladapter_cfg"]["n_causal"]


def test_emu1_causal_transformer_is_t5_base_as_the_release_builds_it():
    """The release asks for t5-base's config; its stack is a T5 decoder (causal, relative buckets
    unidirectional), block 0 alone owns the relative bias, no attention scaling."""
    c, model = _full("emu1").model.connector, rm.official_emu1()[0]
    stack = model.cformer.cformer
    attention = stack.block[0].layer[0].SelfAttention
    assert stack.is_decoder and attention.is_decoder and attention.has_relative_attention_bias
    assert not any(b.layer[0].SelfAttention.has_relative_attention_bias for b in stack.block[1:])
    assert (c.num_buckets, c.max_distance, c.norm_eps) == (attention.relative_attention_num_buckets,
                                                          attention.relative_attention_max_distance,
                                                          stack.final_layer_norm.variance_epsilon)
    assert (c.d_model, c.num_layers, c.num_heads, c.head_dim, c.d_ff) == (768, 12, 12, 64, 3072)  # t5-base


@pytest.mark.parametrize("name", ["emu2", "emu2_chat"])
def test_emu2_vit_connector_and_image_constants(name):
    conf, constants = official.emu2("conf.emu_conf"), official.emu2("constants")
    release = conf.CLIPVisionCfg(n_query=256) if name == "emu2_chat" else conf.CLIPVisionCfg()  # chat.py
    config, model = _full(name).model, VARIANTS[name][2](0)[0]
    assert (config.vit.image_size, config.vit.patch_size, config.vit.width, config.vit.depth) == (
        release.image_size, release.patch_size, release.width, release.layers) and release.image_size == \
        constants.EVA_IMAGE_SIZE
    assert config.vit.num_heads == release.width // release.head_width
    assert config.vit.mlp_hidden == int(release.width * release.mlp_ratio)
    assert config.vit.post_norm == release.postnorm and not release.rope
    block = model.visual.blocks[0]
    assert config.vit.norm_eps == block.norm1.eps and block.postnorm
    assert config.connector.pool_grid ** 2 == release.n_query
    from emu_jax.models import eva_vit
    assert eva_vit.EVA_MEAN == constants.OPENAI_DATASET_MEAN


def test_emu2_gen_decoder_constants_are_the_release_diffusion_config():
    from emu_jax import config_lib
    with open(official.EMU2_DIFFUSION_CONFIG / "unet" / "config.json") as f:
        unet = json.load(f)
    ours = config_lib.sdxl_unet()
    assert tuple(ours.block_out_channels) == tuple(unet["block_out_channels"])
    assert tuple(ours.transformer_depth) == tuple(unet["transformer_layers_per_block"])
    assert tuple(ours.num_heads) == tuple(unet["attention_head_dim"])
    assert ours.addition_time_embed_dim == unet["addition_time_embed_dim"]
    assert (ours.norm_eps, ours.groups, ours.flip_sin_to_cos, ours.freq_shift) == (
        unet["norm_eps"], unet["norm_num_groups"], unet["flip_sin_to_cos"], unet["freq_shift"])
    assert unet["cross_attention_dim"] == _full("emu2").model.vit.width

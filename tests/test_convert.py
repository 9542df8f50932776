"""Checkpoint conversion: parity of every tower with an independent PyTorch implementation
(transformers, timm, diffusers) after importing its weights, bit-exact import -> export of whole
release files (saved from the official classes, tests/release_models.py), sharded writes, and
strict errors. Parity of whole models with the official forward: tests/test_release_parity.py."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_models as rm
import release_models
from conftest import ROOT, as_flags, load_config, xla_flags_for

torch = pytest.importorskip("torch")

from emu_jax import config_lib  # noqa: E402
from emu_jax.convert import exporter, importer, layouts, plan, tensors  # noqa: E402
from emu_jax.convert.plan import ConversionError  # noqa: E402
from emu_jax.models.emu import build_model  # noqa: E402
from emu_jax.models.unet import UNet  # noqa: E402
from emu_jax.models.vae import AutoencoderKL  # noqa: E402
from emu_jax.parallel import mesh as mesh_lib  # noqa: E402
from emu_jax.checkpoint import restore_params  # noqa: E402

TOLERANCE = 1e-4
# (config variant, what differs): Emu1 with a multi-head LLaMA, Emu2 with grouped kv heads, and
# Emu2 with scanned ViT/LLaMA stacks (the layers of each tower stacked into one array).
VARIANTS = {"emu1_mha": ("emu1", dict(num_kv_heads=0), False), "emu2_gqa": ("emu2", {}, False),
            "emu2_scanned": ("emu2", {}, True)}


def variant_config(name):
    variant, llm, scanned = VARIANTS[name]
    config = load_config("tiny", variant)
    with config.unlocked():
        config.model.llm.update(llm)
        config.model.vit.scan_layers = config.model.llm.scan_layers = scanned
    return config


@pytest.fixture(scope="module", params=list(VARIANTS))
def release(request):
    """(config, reference towers, None, our params imported from them: timm's EVA through the
    eva_timm layout, transformers' LLaMA through llama_hf)."""
    config = variant_config(request.param)
    towers = {"vit": rm.eva(config.model.vit, seed=3), "llm": rm.llama(config.model.llm, config.model.llm.vocab_size, 4)}
    params = {tower: importer.to_params(tensors.from_state_dict(towers[tower].state_dict()), layout, config)[tower]
              for tower, layout in (("vit", "eva_timm"), ("llm", "llama_hf"))}
    return config, towers, None, params


def max_error(ours, reference):
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(reference, np.float32)).max())


def test_eva_matches_timm(release):
    """Pre-norm (EVA-01-CLIP-g shape) and post-norm (EVA-02-CLIP-E shape) blocks."""
    config, towers, _, params = release
    images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    ours = build_model(config.model).vit.apply({"params": params["vit"]}, jnp.asarray(images))
    with torch.no_grad():
        reference = towers["vit"].forward_features(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
    assert max_error(ours, reference) <= TOLERANCE


def test_llama_matches_transformers(release):
    config, towers, _, params = release
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, config.model.llm.vocab_size, size=(2, 11))
    positions, segments = np.tile(np.arange(11), (2, 1)), np.ones_like(tokens)
    logits = build_model(config.model).llm.apply(
        {"params": params["llm"]}, jnp.asarray(tokens),
        method=lambda m, t: m.logits(m(m.embed(t), positions, segments)[0]))
    with torch.no_grad():
        reference = towers["llm"](torch.tensor(tokens)).logits.numpy()
    assert max_error(logits, reference) <= TOLERANCE


def test_causal_former_matches_transformers_t5_decoder_stack():
    """An Emu1 file whose connector keys come from transformers' T5 stack (not the release's copy)."""
    config = release_models.tiny_release_config("emu1_14b")
    m = config.model
    reference = rm._randomise(rm.CausalFormerReference(m.connector, m.vit.width, m.llm.hidden), 5)
    state = dict(release_models.official_emu1()[1], **rm.prefixed("", reference))
    towers = {"connector": reference}
    params = importer.to_params(tensors.from_state_dict(state), "emu1", config)
    vit_tokens = np.random.RandomState(2).randn(2, 17, config.model.vit.width).astype(np.float32)
    ours = build_model(config.model).connector.apply({"params": params["connector"]}, jnp.asarray(vit_tokens),
                                                     method=lambda m, x: m.encode(x)[0])
    with torch.no_grad():
        reference = towers["connector"](torch.tensor(vit_tokens)).numpy()
    assert max_error(ours, reference) <= TOLERANCE


def decoder_config(shape):
    config = load_config("tiny_decoder", "decoder")
    if shape == "sd15":
        with config.unlocked():
            config.model.unet = config_lib.sd15_unet(block_out_channels=(32, 64), cross_attention=(True, False),
                                                     transformer_depth=(1, 1), num_heads=(4, 4), layers_per_block=1,
                                                     groups=8)
    return config


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_unet_matches_diffusers(shape):
    """SD1.5 shape (conv projections, a level without attention) and SDXL shape (linear
    projections, the text_time embedding of pooled conditioning and six time ids)."""
    config = decoder_config(shape)
    width = config.model.vit.width
    reference = rm.unet(config.model.unet, width, seed=7)
    params = importer.to_params(tensors.from_state_dict(reference.state_dict()), "diffusers_unet", config)["unet"]
    rng = np.random.RandomState(3)
    latents, timesteps = rng.randn(2, 8, 8, 4).astype(np.float32), np.array([10, 700])
    context = rng.randn(2, 4, width).astype(np.float32)
    extra = dict(pooled=context.mean(1), time_ids=rng.rand(2, 6).astype(np.float32) * 512) if shape == "sdxl" else {}
    ours = UNet(**config.model.unet).apply({"params": params}, latents, timesteps, context, **extra)
    added = {"added_cond_kwargs": {"text_embeds": torch.tensor(extra["pooled"]),
                                   "time_ids": torch.tensor(extra["time_ids"])}} if extra else {}
    with torch.no_grad():
        expected = reference(torch.tensor(latents).permute(0, 3, 1, 2), torch.tensor(timesteps), torch.tensor(context),
                             **added).sample.permute(0, 2, 3, 1).numpy()
    assert max_error(ours, expected) <= TOLERANCE


def test_vae_matches_diffusers():
    config = decoder_config("sdxl")
    reference = rm.vae(config.model.vae, seed=8)
    params = importer.to_params(tensors.from_state_dict(reference.state_dict()), "diffusers_vae", config)["vae"]
    images = np.random.RandomState(4).rand(2, 32, 32, 3).astype(np.float32) * 2 - 1
    vae = AutoencoderKL(**config.model.vae)
    mean, logvar = vae.apply({"params": params}, images, method=lambda m, x: m.encode(x))
    decoded = vae.apply({"params": params}, mean, method=lambda m, z: m.decode(z))
    with torch.no_grad():
        posterior = reference.encode(torch.tensor(images).permute(0, 3, 1, 2)).latent_dist
        expected = reference.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert max_error(mean, nhwc(posterior.mean)) <= TOLERANCE
    assert max_error(logvar, nhwc(posterior.logvar)) <= TOLERANCE
    assert max_error(decoded, expected) <= TOLERANCE


# ----------------------------------------------------------------------------- whole release files

def release_config(name, scanned=False):
    config = release_models.tiny_release_config(name)
    with config.unlocked():
        config.model.vit.scan_layers = config.model.llm.scan_layers = scanned
    return config


def to_hf(native: dict) -> dict:
    """EmuModel's keys as the Hugging Face EmuForCausalLM holds them: the model under `model.`,
    project_up/down beside it (BAAI/Emu2's modeling_emu.py)."""
    return {k if k.startswith("project_") else "model." + k: v for k, v in native.items()}


def write_release(kind, directory):
    """A release file of each kind, saved from the official classes with torch / the safetensors
    library (not our writer). Returns (config, layout, source path, the state dict the file holds)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    if kind == "emu1_bin":
        config, state = release_config("emu1_14b"), release_models.official_emu1()[1]
        path = os.path.join(directory, "pytorch_model.bin")
        torch.save({"module": state}, path)  # Emu1's release wraps the state dict
        return config, "emu1", path, state
    if kind == "emu2_bf16_safetensors":
        config = release_config("emu2_37b", scanned=True)
        state = {k: v.to(torch.bfloat16) for k, v in release_models.official_emu2()[1].items()}
        state["decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # dropped by name
        path = os.path.join(directory, "emu2.safetensors")
        save_file(state, path)
        return config, "emu2", path, state
    if kind == "emu2_hf_sharded":
        config, state = release_config("emu2_37b"), to_hf(release_models.official_emu2()[1])
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, names in shards.items():
            save_file({k: state[k].contiguous() for k in names}, os.path.join(directory, name))
        path = os.path.join(directory, "model.safetensors.index.json")
        with open(path, "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}, f)
        return config, "emu2_hf", path, state
    raise ValueError(kind)


def sharded_abstract(config, layout_name, mesh):
    targets = plan.targets(config, layouts.get_layout(layout_name), mesh)
    return plan.nested({p: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
                             for p, t in targets.items()})


# (Emu2-Gen's single file: test_release_parity.py's round trip into the official pipeline, bit for bit.)
@pytest.mark.parametrize("kind", ["emu1_bin", "emu2_bf16_safetensors", "emu2_hf_sharded"])
def test_release_file_imports_sharded_and_exports_bit_for_bit(kind, tmp_path):
    config, layout_name, path, state = write_release(kind, str(tmp_path / "release"))
    mesh = mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    source = tensors.open_source(path)
    summary = importer.import_checkpoint(source, layout_name, config, str(tmp_path / "ours"), mesh=mesh,
                                         progress=False)
    layout = layouts.get_layout(layout_name)
    junk = [k for k in state if layouts.is_junk(layout, k)]
    carried = [k for k in state if layouts.is_carried(layout, k)]  # dropped, kept verbatim for export
    assert sorted(summary["dropped"]) == sorted(junk + carried) and sorted(summary["carried"]) == sorted(carried)
    assert summary["tensors"] == len(state) - len(junk) - len(carried)

    # the trainer's loader places the checkpoint on the mesh; values equal the in-memory conversion
    restored = restore_params(summary["checkpoint"], sharded_abstract(config, layout_name, mesh))
    expected = importer.to_params(source, layout_name, config)
    for (p, ours), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
        assert np.array_equal(np.asarray(ours), want), jax.tree_util.keystr(p)
    embed = restored["llm"]["embed_tokens"]["embedding"]
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape[1] == embed.shape[1] // 8

    out = str(tmp_path / "export.safetensors")
    exporter.export_checkpoint(summary["checkpoint"], layout_name, config, out, progress=False)
    exported = tensors.open_source(out)
    kept = [k for k in state if k not in junk]
    assert sorted(exported.keys()) == sorted(kept)
    for key in kept:
        original = tensors.torch_to_numpy(state[key])
        again = exported.read(key)
        assert again.dtype == original.dtype and again.shape == original.shape, key
        assert np.array_equal(again.view(np.uint8), np.ascontiguousarray(original).view(np.uint8)), key

    # without the recorded source, our parameter names alone spell the same keys
    fresh = exporter.export_entries(summary["checkpoint"], layout_name, config, use_recorded=False)
    fresh[1]()
    assert sorted(key for key, *_ in fresh[0]) == sorted(kept)


def test_sharded_export_writes_an_index_that_imports_again(tmp_path):
    config, layout_name, path, state = write_release("emu2_hf_sharded", str(tmp_path / "release"))
    summary = importer.import_checkpoint(tensors.open_source(path), layout_name, config, str(tmp_path / "a"),
                                         progress=False)
    exporter.export_checkpoint(summary["checkpoint"], layout_name, config, str(tmp_path / "shards"),
                               max_shard_bytes=400_000, progress=False)
    index = json.load(open(tmp_path / "shards" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(state)
    again = importer.to_params(tensors.open_source(str(tmp_path / "shards" / "model.safetensors.index.json")),
                               layout_name, config)
    first = importer.to_params(tensors.open_source(path), layout_name, config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))


# ----------------------------------------------------------------------------- strictness

@pytest.fixture(scope="module")
def emu2_state():
    return release_config("emu2_37b"), dict(release_models.official_emu2()[1])


def convert_error(config, state, layout="emu2", tmp_path=None):
    out = None if tmp_path is None else str(tmp_path / "out")
    with pytest.raises(ConversionError) as error:
        if out is None:
            importer.to_params(tensors.from_state_dict(state), layout, config)
        else:
            importer.import_checkpoint(tensors.from_state_dict(state), layout, config, out, progress=False)
    if out is not None:
        assert not os.path.exists(os.path.join(out, "checkpoints")), "a failed conversion must leave no checkpoint"
    return str(error.value)


def test_missing_unexpected_misshaped_and_duplicate_keys_are_listed(emu2_state, tmp_path):
    config, state = emu2_state
    broken = dict(state)
    del broken["decoder.lm.model.layers.1.mlp.up_proj.weight"]
    broken["visual.blocks.0.attn.extra.weight"] = torch.zeros(3)
    broken["visual.blocks.1.mlp.fc1.weight"] = torch.zeros(7, 64)
    message = convert_error(config, broken, tmp_path=tmp_path)
    assert "missing keys (1):\n    decoder.lm.model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected keys (1):\n    visual.blocks.0.attn.extra.weight" in message
    assert "visual.blocks.1.mlp.fc1.weight: checkpoint [7, 64], model [256, 64]" in message


def test_two_spellings_of_one_weight_and_unpaired_lora_adapters_are_named():
    """Emu-I: peft's old `q_proj.weight` beside the current `q_proj.base_layer.weight` both fill
    one parameter; an adapter without its other half cannot be merged."""
    config = release_models.tiny_release_config("emu1_14b:instruct")
    state = dict(release_models.official_emu1(instruct=True)[1])
    attention = "decoder.lm.base_model.model.model.layers.0.self_attn."
    state[attention + "q_proj.weight"] = state[attention + "q_proj.base_layer.weight"]
    del state[attention + "k_proj.lora_B.default.weight"]
    message = convert_error(config, state, layout="emu1_instruct")
    assert f"{attention}q_proj.weight and {attention}q_proj.base_layer.weight both fill" in message \
        or f"{attention}q_proj.base_layer.weight and {attention}q_proj.weight both fill" in message
    assert f"{attention}k_proj: lora_A, lora_B and the base weight must come together (found ['A', 'weight'])" \
        in message


def test_vocabulary_mismatch_is_reported_not_padded(emu2_state):
    config, state = emu2_state
    vocab = config.model.llm.vocab_size
    grown = dict(state)
    for key in ("decoder.lm.model.embed_tokens.weight", "decoder.lm.lm_head.weight"):
        grown[key] = torch.cat([state[key], torch.zeros(2, state[key].shape[1])])
    message = convert_error(config, grown)
    width = config.model.llm.hidden
    assert "vocabulary size differs" in message and f"checkpoint [{vocab + 2}, {width}], model [{vocab}, {width}]" \
        in message


def test_scanned_layer_beyond_the_model_and_missing_layer_are_named(emu2_state):
    config = release_config("emu2_37b", scanned=True)
    state = dict(emu2_state[1])
    state["decoder.lm.model.layers.2.input_layernorm.weight"] = state["decoder.lm.model.layers.1.input_layernorm.weight"]
    del state["visual.blocks.1.norm1.bias"]
    message = convert_error(config, state)
    assert "decoder.lm.model.layers.2.input_layernorm.weight (layer 2; the model has 2)" in message
    assert "missing keys (1):\n    visual.blocks.1.norm1.bias" in message


def test_non_strict_import_drops_unknown_keys_and_known_junk_always(emu2_state):
    config, state = emu2_state
    extra = dict(state, **{"visual.head.weight": torch.zeros(2, 2),
                           "decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    assert "unexpected keys (1):\n    visual.head.weight" in convert_error(config, extra)
    params = importer.to_params(tensors.from_state_dict(extra), "emu2", config, strict=False)
    assert set(params) == {"vit", "connector", "llm"}


def test_an_interrupted_conversion_leaves_no_checkpoint_and_a_rerun_succeeds(emu2_state, tmp_path):
    config, state = emu2_state
    source = tensors.from_state_dict(state)
    reads = {"n": 0}
    real_read = source._reader

    def failing(file, key):  # the disk goes away half way through
        reads["n"] += 1
        if reads["n"] > len(state) // 2:
            raise OSError("input/output error")
        return real_read(file, key)

    source._reader = failing
    with pytest.raises(tensors.SourceError, match="cannot read tensor"):
        importer.import_checkpoint(source, "emu2", config, str(tmp_path), progress=False, flush_bytes=1)
    assert not os.path.exists(tmp_path / "checkpoints")
    source._reader = real_read
    summary = importer.import_checkpoint(source, "emu2", config, str(tmp_path), progress=False)
    assert os.listdir(summary["checkpoint"]) == ["0"] and not os.path.exists(tmp_path / ".convert-staging")


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(tensors.SourceError, match="broken.safetensors: not a readable safetensors"):
        tensors.open_source(str(bad))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(tensors.SourceError, match="model.safetensors.index.json: not a checkpoint index"):
        tensors.open_source(str(index))


def release_cli_flags() -> list[str]:
    """configs/emu2_37b.py at release_config("emu2_37b", scanned=True)'s shape, as CLI flags."""
    overrides = {f"model.vit.{k}": v for k, v in dict(release_models.TINY_VIT, image_size=128, scan_layers=True).items()}
    overrides |= {f"model.llm.{k}": v for k, v in dict(release_models.TINY_LLM, scan_layers=True).items()}
    return [f"--config={ROOT / 'configs' / 'emu2_37b.py'}", *as_flags(overrides), "--config.model.dtype=float32"]


def test_convert_cli_imports_and_exports(tmp_path):
    config, layout_name, path, state = write_release("emu2_bf16_safetensors", str(tmp_path / "release"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "emu_jax.convert"]
    cfg = release_cli_flags() + ["--layout=emu2"]
    run = lambda *args: subprocess.run(base + list(args), cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: E731
    flags = ("import", *cfg, f"--source={path}", f"--out={tmp_path / 'ours'}", "--config.mesh.fsdp=8",
             "--config.mesh.data=1")
    done = run(*flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"converted {len(state) - 1} tensors" in done.stdout and "dropped 1 keys our model does not use" in done.stdout
    again = run(*flags)  # issue #20: into a directory that already holds a step
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'ours'}: checkpoints/ already holds 0")
    done = run("export", *cfg, f"--checkpoint={tmp_path / 'ours' / 'checkpoints'}", f"--out={tmp_path / 'x.safetensors'}")
    assert done.returncode == 0, done.stderr[-3000:]
    exported = tensors.open_source(str(tmp_path / "x.safetensors"))
    assert exported.dtypes["visual.pos_embed"] == "bfloat16" and len(exported.keys()) == len(state) - 1


@pytest.mark.slow
def test_two_processes_write_their_own_shards_of_one_checkpoint(tmp_path):
    import portpicker
    config, layout_name, path, state = write_release("emu2_bf16_safetensors", str(tmp_path / "release"))
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags_for(2))
    args = [sys.executable, "-m", "emu_jax.convert", "import", *release_cli_flags(), "--layout=emu2",
            f"--source={path}", f"--out={tmp_path / 'ours'}", "--config.mesh.data=1", "--config.mesh.fsdp=4",
            f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
            "--config.distributed.cpu_collectives=gloo"]
    procs = [subprocess.Popen(args + [f"--config.distributed.process_id={i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    params_dir = tmp_path / "ours" / "checkpoints" / "0" / "params"
    written = os.listdir(params_dir)  # each process wrote its own shards into its own OCDBT tree
    assert all(any(name.startswith(f"ocdbt.process_{i}") for name in written) for i in range(2)), written

    mesh = mesh_lib.make_mesh(config_lib.ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    restored = restore_params(str(tmp_path / "ours" / "checkpoints"), sharded_abstract(config, layout_name, mesh))
    expected = importer.to_params(tensors.open_source(path), layout_name, config)
    for (p, ours), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
        assert np.array_equal(np.asarray(ours), want), jax.tree_util.keystr(p)


def test_a_layout_outside_the_configs_model_family_is_named(emu2_state):
    config, state = emu2_state  # Emu2 without a visual decoder: the UNet's layout is not its own
    message = convert_error(config, state, layout="diffusers_unet")
    assert message.startswith("layout diffusers_unet is not a layout of the config's model family 'emu' (its "
                              "layouts: emu1, emu1_instruct, emu2,"), message


def test_a_failed_safetensors_write_leaves_no_file_behind(tmp_path):
    """A tensor whose producer gives the wrong shape stops the write naming it; neither the file nor
    its partial copy remains (an export that fails half-way leaves nothing a loader could pick up)."""
    from emu_jax.convert.tensors import write_safetensors
    out = tmp_path / "model.safetensors"
    entries = [("a", (2, 3), "float32", lambda: np.zeros((2, 3))), ("b", (4,), "float32", lambda: np.zeros((5,)))]
    with pytest.raises(ValueError, match=r"model.safetensors: tensor b produced shape \(5,\), header says \(4,\)"):
        write_safetensors(str(out), entries)
    assert list(tmp_path.iterdir()) == []

"""LoRA adapters (models/lora.py): where they go, what they compute, and that training moves them alone."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_key, load_config
from model_helpers import batch_of, random_images, row

from emu_jax import config_lib
from emu_jax.data import pipeline
from emu_jax.models import lora as lora_lib
from emu_jax.models.emu import build_model, example_inputs
from emu_jax.parallel import mesh as mesh_lib

# Emu-I's targets (the LLM's attention projections) and the ViT's fused qkv: a kernel with two
# output axes, and o_proj one with two input axes
TARGETS = r"^llm/.*/self_attn/(q_proj|k_proj|v_proj|o_proj)$|^vit/.*/attn/qkv$"


def lora_config(scan: bool = False, rank: int = 4, variant: str = "emu2"):
    """The tiny model with adapters on TARGETS; Emu1's also on every projection of its Causal
    Transformer (T5 self- and cross-attention, feed-forward, output projection, regression head)."""
    config = load_config("tiny", variant)
    with config.unlocked():
        config.model.lora.update(rank=rank, alpha=8.0, targets=TARGETS + ("|^connector/" if variant == "emu1" else ""))
        config.model.llm.scan_layers = config.model.vit.scan_layers = scan
        if variant == "emu1":
            config.model.connector.scan_layers = scan
    return config


def training_config(data_dir):
    """The tiny recipe with adapters alone trained, on the digits world, small and unevaluated."""
    config = lora_config()
    with config.unlocked():
        config.data.update(data_dir=data_dir, global_batch_size=8, worker_count=0)
        config.evals = {}
        config.optimizer.train_only = lora_lib.ADAPTERS
    return config


def boxed(model):
    return jax.eval_shape(lambda k, kw: model.init(k, **kw), init_key(0), example_inputs(model))["params"]


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_sit_beside_their_kernels_sharded_on_its_axes(scan):
    config = lora_config(scan)
    params = boxed(build_model(config.model))
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    adapted = sorted(name.removesuffix("/lora_a") for name in flat if name.endswith("/lora_a"))
    layers = ["layers"] if scan else ["layers_0", "layers_1"]
    blocks = ["blocks"] if scan else ["blocks_0", "blocks_1"]
    assert adapted == sorted([f"llm/{layer}/self_attn/{p}" for layer in layers for p in ("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj")]
                             + [f"vit/{block}/attn/qkv" for block in blocks])
    for name in adapted:
        kernel, a, b = (flat[f"{name}/{leaf}"] for leaf in ("kernel", "lora_a", "lora_b"))
        contract = 2 if name.endswith("o_proj") else 1
        stacked = 1 if scan else 0  # a scanned stack's leading layer axis
        axes = kernel.names[stacked:]
        assert a.names[stacked:] == axes[:contract] + (None,) and b.names[stacked:] == (None,) + axes[contract:]
        assert a.value.shape[stacked:] == kernel.value.shape[stacked:][:contract] + (4,)
        assert b.value.shape[stacked:] == (4,) + kernel.value.shape[stacked:][contract:]


@pytest.mark.parametrize("scan, variant", [(False, "emu2"), (True, "emu2"), (True, "emu1")])
def test_an_adapted_model_starts_as_its_base_and_merges_exactly(scan, variant):
    """B = 0: the adapted model computes its base bit for bit; with trained (random) adapters it
    computes what the base model computes on `merge`d kernels (W + alpha / r * A . B)."""
    config = lora_config(scan, variant=variant)
    model, base_model = build_model(config.model), build_model(lora_config(scan, rank=0, variant=variant).model)
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(model))
    params = nn.unbox(jax.jit(lambda k, b: model.init(k, **b))(init_key(0), inputs)["params"])
    rng = np.random.RandomState(1)
    batch = batch_of([row(config, model, ["t3", "img", "t4", "img", "t2"], rng)], random_images(rng, 1, 2))
    # each model's forward compiled once (op by op, the three cases took 57 s here, compiled 41 s)
    adapted_forward = jax.jit(lambda p: model.apply({"params": p}, **batch))
    base_forward = jax.jit(lambda p: base_model.apply({"params": p}, **batch))
    base, adapters = lora_lib.split(params)
    np.testing.assert_array_equal(adapted_forward(params).logits, base_forward(base).logits)
    keys = iter(jax.random.split(jax.random.key(3), 100))
    trained = lora_lib.join(base, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), adapters))
    adapted = adapted_forward(trained)
    merged = base_forward(lora_lib.merge(trained, lora_lib.spec(config.model.lora)))
    assert float(jnp.abs(adapted.logits - base_forward(base).logits).max()) > 1e-3  # the adapters do act
    np.testing.assert_allclose(adapted.logits, merged.logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(adapted.regression, merged.regression, atol=2e-5, rtol=1e-5)
    if variant == "emu1":  # every projection of the Causal Transformer carries one
        names = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
        connector = sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("connector/"))
        assert connector == sorted(["q", "k", "v", "o"] * 2 + ["wi", "wo", "projection", "stu_regress_head"]), connector


def test_lora_training_moves_only_the_adapters_with_optimizer_state_for_them_alone(digits_world):
    from test_train import setup_state

    from emu_jax.train.optimizer import path_name
    config = training_config(digits_world)
    with config.unlocked():
        config.model.lora.dropout = 0.1
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    _, _, state, step = setup_state(config, mesh)
    before = jax.device_get(state.params)
    data = iter(pipeline.make_dataset(config.data, config.model, 4, worker_count=0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        for _ in range(3):
            state, metrics = step(state, pipeline.to_global(next(data), mesh))
    after = jax.device_get(state.params)
    base_before, adapters_before = lora_lib.split(before)
    base_after, adapters_after = lora_lib.split(after)
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)
    moved = jax.tree_util.tree_map_with_path(lambda p, a, b: (path_name(p), bool(np.any(a != b))),
                                             adapters_after, adapters_before)
    assert all(changed for _, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * size(adapters_after)
    trainable, total = lora_lib.count(after)
    assert trainable == size(adapters_after) and trainable < 0.05 * total


def test_a_lora_run_checkpoints_its_adapters_alone_and_resumes_exactly(tmp_path, digits_world):
    """Interrupted at step 2 and resumed to 4 (the base rebuilt from the seeded initialisation, the
    adapters and their optimizer state read back) = 4 steps straight; the checkpoint holds the
    adapters only, and a generator over base + adapter checkpoints holds the trained parameters."""
    from model_helpers import save_params

    from emu_jax.checkpoint import restore_params
    from emu_jax.convert import exporter, importer, tensors
    from emu_jax.generate.generator import Generator
    from emu_jax.train import trainer

    def run(workdir, steps):
        config = training_config(digits_world)
        with config.unlocked():
            config.train.update(steps=steps, checkpoint_every=2, eval_every=0, log_every=1)
        trainer.train(config, str(workdir))
        return config

    config = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4)
    model = build_model(config.model)
    abstract = nn.unbox(boxed(model))
    base_abstract, adapters_abstract = lora_lib.split(abstract)
    straight = restore_params(str(tmp_path / "straight" / "checkpoints"), adapters_abstract)
    resumed = restore_params(str(tmp_path / "resumed" / "checkpoints"), adapters_abstract)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    with pytest.raises(KeyError, match="lacks"):  # no base weights in a LoRA checkpoint
        restore_params(str(tmp_path / "straight" / "checkpoints"), {"llm": base_abstract["llm"]})

    mesh = mesh_lib.make_mesh(config.mesh, allow_subset=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        _, shardings = mesh_lib.abstract_model(model, example_inputs(model), mesh, config.mesh.rules)
        initial = trainer.init_params(model, example_inputs(model), shardings, config.seed, config.init_prng)
    save_params(tmp_path / "base", lora_lib.split(jax.device_get(initial))[0])
    generator = Generator.from_checkpoints(config, str(tmp_path / "base"), adapter=str(tmp_path / "straight" /
                                                                                         "checkpoints"))
    expected = lora_lib.join(lora_lib.split(jax.device_get(initial))[0], jax.device_get(straight))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(generator.params), expected)

    # `convert export --adapter`: the release layout with the adapters merged into the weights
    out = str(tmp_path / "merged.safetensors")
    exporter.export_checkpoint(str(tmp_path / "base"), "emu2", config, out, progress=False,
                               adapter_dir=str(tmp_path / "straight" / "checkpoints"))
    imported = importer.to_params(tensors.open_source(out), "emu2", lora_config(rank=0))
    merged = lora_lib.merge(expected, lora_lib.spec(config.model.lora))
    jax.tree.map(lambda ours, want: np.testing.assert_allclose(ours, want, atol=1e-6), imported,
                 {tower: merged[tower] for tower in imported})
    q = ("llm", "layers_0", "self_attn", "q_proj", "kernel")
    moved = np.abs(merged["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"] - expected["llm"]["layers_0"]["self_attn"]
                   ["q_proj"]["kernel"]).max()
    assert moved > 0, q  # the trained adapters did change what is exported


def test_lora_needs_targets():
    config = config_lib.with_overrides(load_config("tiny"), {"model.lora.rank": 4})
    with pytest.raises(ValueError, match="model.lora.targets"):
        build_model(config.model)


def test_an_adapter_with_a_config_without_lora_is_refused_not_ignored(tmp_path):
    """A rank-0 config has no adapter parameters: generate and export with --adapter would silently
    use the base model alone; both say so in one line instead."""
    from emu_jax.convert import exporter
    from emu_jax.generate.generator import Generator
    config = load_config("tiny")
    for build in (lambda: Generator.from_checkpoints(config, str(tmp_path / "base"), adapter=str(tmp_path / "run")),
                  lambda: exporter.Adapters(str(tmp_path / "run"), config)):
        with pytest.raises(lora_lib.LoraConfigError, match=r"--adapter .*run: the config has no model.lora \(rank 0\)"):
            build()


def test_a_grown_vocabulary_keeps_the_checkpoints_rows_and_initialises_the_new(tmp_path):
    """Emu2 -> Emu2-Chat: [USER] and [ASSISTANT] added; train.init_from fills the other rows of the
    embedding and the output head from the checkpoint."""
    from model_helpers import init_params, save_params

    from emu_jax import tokens as tokens_lib
    from emu_jax.train import trainer
    base_model = build_model(load_config("tiny").model)
    base = init_params(base_model)
    save_params(tmp_path / "base", base)
    config = load_config("tiny")
    special, vocab = tokens_lib.emu2_tokens(base=512, chat=True)
    with config.unlocked():
        config.model.tokens, config.model.llm.vocab_size = special, vocab
    model = build_model(config.model)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        abstract, shardings = mesh_lib.abstract_model(model, example_inputs(model), mesh, config.mesh.rules)
        fresh = trainer.init_params(model, example_inputs(model), shardings, seed=5)
        loaded = jax.device_get(trainer.load_towers(fresh, {"llm": str(tmp_path / "base")}, abstract, shardings))
    fresh = jax.device_get(fresh)
    old = base["llm"]["embed_tokens"]["embedding"].shape[0]
    assert loaded["llm"]["embed_tokens"]["embedding"].shape[0] == old + 2
    np.testing.assert_array_equal(loaded["llm"]["embed_tokens"]["embedding"][:old], base["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(loaded["llm"]["embed_tokens"]["embedding"][old:],
                                  fresh["llm"]["embed_tokens"]["embedding"][old:])
    np.testing.assert_array_equal(loaded["llm"]["lm_head"]["kernel"][:, :old], base["llm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(loaded["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
                                  base["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"])


@pytest.mark.parametrize("name, variant, lora, loss, chat_format", [
    ("emu2_chat", "lora", True, (1.0, 0.0), "emu2_chat"), ("emu2_chat", "full", False, (1.0, 0.0), "emu2_chat"),
    ("emu1_14b", "instruct_lora", True, (1.0, 0.0), "emu_i"), ("emu1_14b", "instruct_full", False, (1.0, 0.0), "emu_i"),
    ("emu2_gen", "lora", True, (0.0, 1.0), "emu2_chat"), ("emu2_gen", "full", False, (0.0, 1.0), "emu2_chat")])
def test_the_release_fine_tuning_recipes(name, variant, lora, loss, chat_format):
    """LoRA recipes train the adapters alone over a bf16 base; full ones train all but the visual
    encoder; chat recipes score text in their model's format, generation recipes regression only."""
    config = load_config(name, variant)
    assert (config.loss.text_weight, config.loss.regression_weight) == loss
    assert config.data.chat_format == chat_format and config.data.train_sources
    if lora:
        assert config.model.lora.rank == 16 and config.optimizer.train_only == lora_lib.ADAPTERS
        assert config.model.param_dtype == "bfloat16" and not config.optimizer.freeze
    else:
        assert config.model.lora.rank == 0 and config.optimizer.freeze == "^vit/" and not config.optimizer.train_only
    base = load_config(name, "instruct" if name == "emu1_14b" else None).model
    assert base.llm.vocab_size == config.model.llm.vocab_size and base.connector == config.model.connector

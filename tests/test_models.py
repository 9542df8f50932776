"""Model-family tests on tiny random towers: masking, splicing, caching, layouts, gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import batch_of, init_params, random_images, row, stack_layer_params, tiny

from emu_jax import tokens as tokens_lib
from emu_jax.models import layers
from emu_jax.train.losses import emu_loss

VARIANTS = ["emu2", "emu1"]


def apply(model, params, batch):
    """The model's forward pass, jitted (eager dispatch of a whole model is many times slower)."""
    return jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, batch)


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_later_token_or_image_never_changes_an_earlier_output(variant):
    config, model = tiny(variant)
    rng = np.random.RandomState(0)
    ids = row(config, model, ["t3", "img", "t4", "img", "t3"], rng)
    batch = batch_of([ids], random_images(rng, 1, 2))
    params = init_params(model, batch)
    base = apply(model, params, batch)

    j = 3 + model.visual_tokens_per_image + 2 + 2  # a text token between the two images
    changed = dict(batch, tokens=batch["tokens"].at[0, j].set((ids[j] + 7) % 500))
    out = apply(model, params, changed)
    np.testing.assert_array_equal(out.logits[:, :j], base.logits[:, :j])
    np.testing.assert_array_equal(out.regression[:, :j], base.regression[:, :j])
    assert np.abs(out.logits[:, j:] - base.logits[:, j:]).max() > 1e-4

    second_image = ids.index(config.model.tokens.image, j)  # first <image> of the second block
    changed = dict(batch, images=batch["images"].at[0, 1].add(1))
    out = apply(model, params, changed)
    np.testing.assert_array_equal(out.logits[:, :second_image], base.logits[:, :second_image])
    assert np.abs(out.logits[:, second_image:] - base.logits[:, second_image:]).max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_visual_embeddings_land_at_image_positions_in_order(variant):
    """Two rows: an image then three video frames, and one image with an unused padding slot."""
    config, model = tiny(variant)
    rng = np.random.RandomState(1)
    rows = [row(config, model, ["t2", "img", "t1", "img", "img", "img", "t2"], rng),
            row(config, model, ["t5", "img", "t3"], rng)]
    batch = batch_of(rows, random_images(rng, 2, 4))
    params = init_params(model, batch)
    run = jax.jit(lambda p, t, i: model.apply(
        {"params": p}, t, i, method=lambda m, t, i: (m.embed(t, i), m.encode_images(i), m.llm.embed(t))))
    (embeds, targets), (visual, visual_targets), text = run(params, batch["tokens"], batch["images"])
    image_id = config.model.tokens.image
    for b in range(2):
        slots = np.flatnonzero(np.asarray(batch["tokens"][b]) == image_id)
        assert len(slots) == (4 if b == 0 else 1) * model.visual_tokens_per_image
        np.testing.assert_array_equal(embeds[b, slots], visual[b, :len(slots)])
        others = np.setdiff1d(np.arange(batch["tokens"].shape[1]), slots)
        np.testing.assert_array_equal(embeds[b, others], text[b, others])
        # the regression target at t is the visual target of t + 1 when t + 1 is an <image>
        np.testing.assert_array_equal(targets[b, slots - 1], visual_targets[b, :len(slots)])
        np.testing.assert_array_equal(targets[b, np.setdiff1d(np.arange(targets.shape[1]), slots - 1)], 0.0)


def test_loss_masks_select_text_targets_and_next_visual_embeddings():
    special, _ = tokens_lib.emu2_tokens(base=512)
    p, i, e, m = special.pad, special.img, special.img_end, special.image
    # doc 1: "5 [IMG] <image> <image> [/IMG] 6", doc 2: "7 8", then padding
    tokens = np.array([[5, i, m, m, e, 6, 7, 8, p, p]])
    segments = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 0, 0]])
    text, regression = tokens_lib.loss_masks(tokens, segments, special)
    # predictions scored: 5->[IMG]? no (image token); [/IMG]->6 yes; 7->8 yes; 6->7 crosses documents
    np.testing.assert_array_equal(text, [[0, 0, 0, 0, 1, 0, 1, 0, 0, 0]])
    # [IMG] -> first <image>, first <image> -> second <image>; last <image> -> [/IMG] is not scored
    np.testing.assert_array_equal(regression, [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_losses_ignore_unmasked_positions_and_see_masked_ones(variant):
    config, model = tiny(variant)
    rng = np.random.RandomState(2)
    ids = row(config, model, ["t3", "img", "t4"], rng) + [config.model.tokens.pad] * 3
    batch = batch_of([ids], random_images(rng, 1, 1))
    batch["segment_ids"] = batch["segment_ids"].at[0, -3:].set(0)
    text_mask, regression_mask = tokens_lib.loss_masks(np.asarray(batch["tokens"]),
                                                       np.asarray(batch["segment_ids"]), config.model.tokens)
    batch.update(text_mask=jnp.asarray(text_mask), regression_mask=jnp.asarray(regression_mask))
    params = init_params(model, {k: batch[k] for k in ("tokens", "positions", "segment_ids", "images")})
    out = apply(model, params, {k: batch[k] for k in ("tokens", "positions", "segment_ids", "images")})
    loss = lambda o: emu_loss(o, batch, text_weight=1.0, regression_weight=1.0)[1]  # noqa: E731
    base = loss(out)
    assert float(base["text_tokens"]) == text_mask.sum() and float(base["regression_tokens"]) == regression_mask.sum()
    off_text, on_text = np.flatnonzero(text_mask[0] == 0)[0], np.flatnonzero(text_mask[0])[0]
    off_reg, on_reg = np.flatnonzero(regression_mask[0] == 0)[0], np.flatnonzero(regression_mask[0])[0]
    bumped = out._replace(logits=out.logits.at[0, off_text].add(5.0),
                          regression=out.regression.at[0, off_reg].add(5.0))
    assert loss(bumped)["text_loss"] == base["text_loss"]
    assert loss(bumped)["regression_loss"] == base["regression_loss"]
    bumped = out._replace(logits=out.logits.at[0, on_text].add(jax.nn.one_hot(7, out.logits.shape[-1]) * 5.0),
                          regression=out.regression.at[0, on_reg].add(5.0))
    assert loss(bumped)["text_loss"] != base["text_loss"]
    assert loss(bumped)["regression_loss"] > base["regression_loss"]


@pytest.mark.parametrize("variant,scan", [("emu2", False), ("emu1", True)])
def test_kv_cache_decoding_equals_full_forward_with_left_padding(variant, scan):
    config, model = tiny(variant, scan_layers=scan)
    rng = np.random.RandomState(3)
    long = row(config, model, ["t3", "img", "t6"], rng)
    short = row(config, model, ["t1", "img", "t4"], rng)
    images = random_images(rng, 2, 1)
    padded = batch_of([long, short], images, left=True)
    params = init_params(model, padded)
    prompt = len(long) - 4
    cache = model.llm.init_cache(2, len(long) + 2)

    def step_fn(m, tokens, positions, segments, images, cache):
        embeds, _ = m.embed(tokens, images)
        return m.decode(embeds, positions, segments, cache)

    step = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=step_fn))
    pieces = []
    logits, _, cache = step(params, padded["tokens"][:, :prompt], padded["positions"][:, :prompt],
                            padded["segment_ids"][:, :prompt], padded["images"], cache)
    pieces.append(logits)
    for t in range(prompt, len(long)):
        sl = slice(t, t + 1)
        logits, _, cache = step(params, padded["tokens"][:, sl], padded["positions"][:, sl],
                                padded["segment_ids"][:, sl], None, cache)
        pieces.append(logits)
    cached = np.concatenate(pieces, axis=1)
    for b, ids in enumerate([long, short]):
        alone = apply(model, params, batch_of([ids], images[b:b + 1]))
        np.testing.assert_allclose(cached[b, -len(ids):], alone.logits[0], atol=2e-5, rtol=1e-5)
    assert int(cache.index) == len(long)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    config, gqa = tiny("emu2")
    _, mha = tiny("emu2", num_kv_heads=4)
    rng = np.random.RandomState(4)
    batch = batch_of([row(config, gqa, ["t4", "img", "t5"], rng)], random_images(rng, 1, 1))
    params = init_params(gqa, batch)
    group = 4 // config.model.llm.num_kv_heads

    def repeat_kv(path, x):
        names = [getattr(k, "key", "") for k in path]
        return jnp.repeat(x, group, axis=-2) if ("k_proj" in names or "v_proj" in names) else x

    mha_params = jax.tree_util.tree_map_with_path(repeat_kv, params)
    np.testing.assert_allclose(apply(mha, mha_params, batch).logits, apply(gqa, params, batch).logits,
                               atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_see_each_other():
    config, model = tiny("emu2")
    rng = np.random.RandomState(5)
    doc_a = row(config, model, ["t3", "img", "t2"], rng)
    doc_b = row(config, model, ["t2", "img", "t4"], rng)
    images = random_images(rng, 1, 2)
    packed = batch_of([doc_a + doc_b], images)
    packed["positions"] = jnp.asarray([list(range(len(doc_a))) + list(range(len(doc_b)))])
    packed["segment_ids"] = jnp.asarray([[1] * len(doc_a) + [2] * len(doc_b)])
    params = init_params(model, packed)
    out = apply(model, params, packed)
    alone_a = apply(model, params, batch_of([doc_a], images[:, :1]))
    alone_b = apply(model, params, batch_of([doc_b], images[:, 1:]))
    np.testing.assert_allclose(out.logits[0, :len(doc_a)], alone_a.logits[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.logits[0, len(doc_a):], alone_b.logits[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scanned_and_per_layer_layouts_compute_the_same_model(variant):
    config, model = tiny(variant)
    _, scanned = tiny(variant, scan_layers=True)
    rng = np.random.RandomState(6)
    batch = batch_of([row(config, model, ["t3", "img", "t3"], rng)], random_images(rng, 1, 1))
    params = init_params(model, batch)
    stacked = dict(params, llm=stack_layer_params(params["llm"], "layers"))
    assert jax.tree.structure(stacked) == jax.tree.structure(init_params(scanned, batch))
    np.testing.assert_allclose(apply(scanned, stacked, batch).logits, apply(model, params, batch).logits,
                               atol=1e-5, rtol=1e-5)
    roundtrip = layers.unstack(stacked["llm"], "layers")  # what the generator decodes
    jax.tree.map(np.testing.assert_array_equal, roundtrip, params["llm"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_parameter(variant):
    config, model = tiny(variant)
    rng = np.random.RandomState(7)
    ids = row(config, model, ["t3", "img", "t4", "img", "t2"], rng)
    batch = batch_of([ids, ids], random_images(rng, 2, 2))
    text_mask, regression_mask = tokens_lib.loss_masks(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]),
                                                       config.model.tokens)
    params = init_params(model, batch)

    def loss(p):
        out = apply(model, p, batch)
        masks = dict(tokens=batch["tokens"], text_mask=text_mask, regression_mask=regression_mask)
        return emu_loss(out, masks, text_weight=1.0, regression_weight=1.0)[0]

    grads = jax.jit(jax.grad(loss))(params)
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]
    assert not dead, f"no gradient reaches {dead}"


def test_bfloat16_compute_stays_close_to_float32():
    config, model = tiny("emu2")
    with config.unlocked():
        config.model.dtype = "bfloat16"
    from emu_jax.models.emu import build_model
    bf16 = build_model(config.model)
    rng = np.random.RandomState(8)
    batch = batch_of([row(config, model, ["t3", "img", "t3"], rng)], random_images(rng, 1, 1))
    params = init_params(model, batch)
    out32, out16 = apply(model, params, batch), apply(bf16, params, batch)
    assert out16.regression.dtype == jnp.bfloat16 and out16.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(out16.logits)).all()
    np.testing.assert_allclose(out16.logits, out32.logits, atol=0.1)


def naive_attention(q, k, v, mask, bias=None):
    """Softmax attention written out, grouped kv heads repeated: the reference for every kernel."""
    k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]) + (0.0 if bias is None else bias)
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


def packed_qkv(seed=0, B=2, T=256, H=4, K=2, D=128):
    rng = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rng.randn(B, T, heads, D), jnp.float32) for heads in (H, K, K))
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[0, 100:] = 2  # two packed documents
    segment_ids[1, 200:] = 0  # padding
    return q, k, v, jnp.asarray(segment_ids)


def test_attention_on_cpu_is_xla_and_equals_the_written_out_softmax():
    q, k, v, segment_ids = packed_qkv()
    mask = layers.SegmentMask(segment_ids)
    assert layers.choose_attention("auto", q, k, mask, None) == "xla"
    out = layers.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, naive_attention(q, k, v, mask.dense()), atol=2e-5)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 0.05)])
def test_xla_attention_gradients_equal_autodiff_of_the_written_out_softmax(dtype, tolerance):
    """The XLA path's hand-written backward (rowsum(dout * out) as the softmax row term) against
    JAX's autodiff of the naive form: packed documents, padding, a query row all masked (uniform
    probabilities, through which no gradient may flow), grouped kv heads, and a learned bias
    broadcast over the batch (T5's relative position bias); gradients of q, k, v and the bias."""
    q, k, v, segment_ids = packed_qkv(T=64, D=32)
    mask = layers.attention_mask(segment_ids, segment_ids).at[0, 0, 5].set(False)
    bias = jnp.asarray(np.random.RandomState(1).randn(1, q.shape[2], 64, 64), jnp.float32)
    weights = jnp.asarray(np.random.RandomState(2).randn(*q.shape), jnp.float32)  # a loss that weighs every output

    def loss(attention):
        return jax.jit(jax.value_and_grad(lambda q, k, v, bias: (attention(q, k, v, bias).astype(jnp.float32)
                                                                 * weights).sum(), argnums=(0, 1, 2, 3)))

    cast = lambda *xs: [x.astype(dtype) for x in xs]  # noqa: E731
    value, grads = loss(lambda q, k, v, bias: layers.dot_product_attention(
        q, k, v, mask=mask, bias=bias, implementation="xla"))(*cast(q, k, v), bias)
    ref_value, ref_grads = loss(lambda q, k, v, bias: naive_attention(q, k, v, mask, bias))(q, k, v, bias)
    np.testing.assert_allclose(value, ref_value, rtol=tolerance)
    for name, grad, ref in zip("qkvb", grads, ref_grads):
        assert grad.dtype == (jnp.float32 if name == "b" else dtype), name
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(grad, np.float32) / scale, np.asarray(ref) / scale, atol=tolerance,
                                   err_msg=f"gradient of {name}")


def test_causal_xla_attention_skips_the_blocks_above_the_diagonal_and_keeps_values_and_gradients():
    """Packed causal self-attention on the XLA path runs in query blocks over their key prefixes:
    at 300 positions, blocks of 128, 128 and a ragged 44. Outputs and gradients of q, k, v equal
    autodiff of the naive dense form (packed documents, padding, grouped kv heads), and the compiled
    forward does at most 3/4 of the dense form's FLOPs (dense: every key for every query)."""
    q, k, v, segment_ids = packed_qkv(T=300, D=32)
    segment_ids = segment_ids.at[0, 250:].set(3)
    mask = layers.SegmentMask(segment_ids)
    weights = jnp.asarray(np.random.RandomState(2).randn(*q.shape), jnp.float32)

    def loss(attention):
        return jax.jit(jax.value_and_grad(lambda q, k, v: (attention(q, k, v) * weights).sum(), argnums=(0, 1, 2)))

    value, grads = loss(lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla"))(q, k, v)
    ref_value, ref_grads = loss(lambda q, k, v: naive_attention(q, k, v, mask.dense()))(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(grad / scale, ref / scale, atol=2e-5, err_msg=f"gradient of {name}")

    def flops(attention):
        return jax.jit(attention).lower(q, k, v).compile().cost_analysis()["flops"]

    blocked = flops(lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask, implementation="xla"))
    dense = flops(lambda q, k, v: layers.dot_product_attention(q, k, v, mask=mask.dense(), implementation="xla"))
    assert blocked <= 0.75 * dense, (blocked, dense)


def test_splash_kernel_equals_xla_on_packed_causal_documents_alone_and_sharded():
    """The TPU kernel's own code, interpreted on CPU: packed documents, padding, grouped kv heads;
    then under a data x tensor mesh, where it runs per device under shard_map."""
    from emu_jax import config_lib
    from emu_jax.parallel import mesh as mesh_lib
    q, k, v, segment_ids = packed_qkv()
    mask = layers.SegmentMask(segment_ids)
    reference = layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v, mask=mask, implementation="splash"),
                               reference, atol=2e-5)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(config_lib.LOGICAL_AXIS_RULES):
        sharded = jax.jit(lambda q, k, v, ids: layers.dot_product_attention(
            q, k, v, mask=layers.SegmentMask(ids), implementation="splash"))(q, k, v, segment_ids)
    np.testing.assert_allclose(sharded, reference, atol=2e-5)


@pytest.mark.parametrize("platform, dtype, masking, expected", [
    ("gpu", jnp.bfloat16, "segments", "cudnn"), ("gpu", jnp.bfloat16, "dense", "cudnn"),
    ("gpu", jnp.float32, "segments", "xla"),  # cuDNN flash attention is bf16/fp16 only
    ("tpu", jnp.bfloat16, "segments", "splash"), ("tpu", jnp.float32, "none", "splash"),
    ("tpu", jnp.bfloat16, "dense", "xla"),  # a dense mask (cached decoding) is not splash's form
    ("cpu", jnp.bfloat16, "segments", "xla")])
def test_auto_attention_follows_the_mesh_platform(platform, dtype, masking, expected):
    q, k, _, segment_ids = packed_qkv(T=128)
    q, k = q.astype(dtype), k.astype(dtype)
    mask = {"segments": layers.SegmentMask(segment_ids), "dense": layers.attention_mask(segment_ids, segment_ids),
            "none": None}[masking]
    device = jax.sharding.AbstractDevice(device_kind=f"fake {platform}", num_cores=None, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        assert layers.choose_attention("auto", q, k, mask, None) == expected
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        layers.choose_attention("flash", q, k, mask, None)


def test_cudnn_is_told_the_mask_is_causal(monkeypatch):
    """cuDNN skips the key tiles above the diagonal only when called with is_causal: a causal
    SegmentMask reaches it as is_causal plus the segments' own (non-causal) mask, which together
    must be the causal segment mask. cuDNN runs only on a GPU, so the same call goes to JAX's XLA
    implementation here (benchmarks/accelerator.py compares the kernels on a GPU)."""
    calls, real = [], jax.nn.dot_product_attention

    def xla_in_place_of_cudnn(*args, implementation, **kwargs):
        calls.append((implementation, kwargs["is_causal"]))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_in_place_of_cudnn)
    q, k, v, segment_ids = packed_qkv()
    for causal in (True, False):
        mask = layers.SegmentMask(segment_ids, causal=causal)
        out = layers.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        np.testing.assert_allclose(out, naive_attention(q, k, v, mask.dense()), atol=2e-5)
    assert calls == [("cudnn", True), ("cudnn", False)]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN kernels exist only on a GPU; the choice of "
                    "cuDNN for a GPU mesh is tested on CPU by test_auto_attention_follows_the_mesh_platform")
def test_cudnn_attention_equals_xla_on_gpu():
    """On a GPU "auto" picks cuDNN for bf16 packed causal attention; it must agree with XLA's
    (bf16 tolerance), gradients included."""
    q, k, v, segment_ids = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in packed_qkv())
    mask = layers.SegmentMask(segment_ids)
    assert layers.choose_attention("auto", q, k, mask, None) == "cudnn"

    def loss(implementation):
        return jax.jit(jax.value_and_grad(lambda q, k, v: layers.dot_product_attention(
            q, k, v, mask=mask, implementation=implementation).astype(jnp.float32).sum(), argnums=(0, 1, 2)))

    (value, grads), (ref_value, ref_grads) = loss("cudnn")(q, k, v), loss("xla")(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=5e-2, rtol=5e-2)


def test_every_consumer_builds_the_model_of_the_configs_family(monkeypatch):
    """`config.model.family` is the only switch: training, generation, conversion, the summary, the
    decoder's encoder towers and the ahead-of-time compile all reach the model through the registry
    (a consumer that imports models.emu directly would bypass a new family)."""
    import sys
    import types

    from conftest import load_config

    from emu_jax import summary
    from emu_jax.convert import plan
    from emu_jax.generate.generator import Generator
    from emu_jax.models import emu, families
    from emu_jax.train import aot
    from emu_jax.train.tasks import make_task
    built = []
    module = types.ModuleType("recording_family")
    module.FAMILY = families.Family(build=lambda c: built.append(c.family) or emu.build_model(c),
                                    example_inputs=emu.example_inputs, train_flops=emu.train_flops,
                                    scanned_layers={"llm": "num_layers"})
    monkeypatch.setitem(sys.modules, "recording_family", module)
    monkeypatch.setitem(families.FAMILIES, "recording", "recording_family")
    config = load_config("tiny_decoder", "decoder")
    with config.unlocked():
        config.model.family = "recording"
    summary.count_params(config.model)
    assert make_task(config).model.vit is not None  # the decoder stage: its encoder towers
    Generator(config, None, None)
    plan._boxed_params(config)  # the Emu towers and the decoder's
    assert built == ["recording"] * 5
    assert aot.scannable_layers(load_config("tiny")) == {"vit": "depth", "llm": "num_layers"}
    with config.unlocked():
        config.task = "emu"
    assert aot.scannable_layers(config) == {"llm": "num_layers"}
    config.model.family = "emu3"
    with pytest.raises(ValueError, match="unknown model family 'emu3'; known: emu, recording, visual_decoder"):
        make_task(config)

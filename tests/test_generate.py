"""Generation: the cached loops against full re-runs, beam search, left-padded batches, sampling
rules, prompt syntax and layouts, sharded inference, and the CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, SMALL_DECODER, as_flags, init_key, load_config, small_decoder_config
from model_helpers import init_params, row, save_params, tiny

from emu_jax import tokens as tokens_lib
from emu_jax.data import media
from emu_jax.generate import decoding, prompts
from emu_jax.generate.decoding import TextSettings

STEPS = 6


def prompt_batch(config, model, layouts, seed=0):
    """Left-padded rows (layouts like ["t3", "img", "t2"]) ending in whatever the layout ends in."""
    rng = np.random.RandomState(seed)
    rows = [row(config, model, layout, rng) for layout in layouts]
    count = max(sum(p == "img" for p in layout) for layout in layouts)
    noise = [rng.normal(size=(count, 32, 32, 3)).astype(np.float32)[:sum(p == "img" for p in layout)] for layout in layouts]
    images = [list(np.clip(n * 40 + 128, 0, 255).astype(np.uint8)) for n in noise]
    batch = prompts.left_pad(rows, images, model.vit.image_size, config.model.tokens.pad)
    return rows, batch


def prefill(model, params, batch, extra):
    state = decoding.start(model, batch["tokens"].shape[0], batch["tokens"].shape[1] + extra)
    return decoding.feed(model, params, state, batch["tokens"], batch["valid"], batch["images"])


_FULL = {}


def full_outputs(model, params, batch, appended_tokens=None):
    """Logits and regressions of the whole (left-padded) sequence with no cache (jitted once per
    model and shape)."""
    tokens = batch["tokens"] if appended_tokens is None else np.concatenate([batch["tokens"], appended_tokens], 1)
    valid = batch["valid"] if appended_tokens is None else np.concatenate(
        [batch["valid"], np.ones_like(appended_tokens)], 1)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
    if model not in _FULL:
        _FULL[model] = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return _FULL[model](params, tokens, positions, valid, batch["images"])


@pytest.fixture(scope="module", params=["emu2", "emu1"])
def setup(request):
    """Both families for what differs between them (the fed-back embedding); Emu2 for the rest."""
    config, model = tiny(request.param)
    return config, model, init_params(model)


@pytest.fixture(scope="module")
def emu2():
    config, model = tiny("emu2")
    return config, model, init_params(model)


def test_cached_greedy_equals_uncached_argmax(setup):
    config, model, params = setup
    _, batch = prompt_batch(config, model, [["t3", "img", "t2"], ["img", "t5"]])
    settings = TextSettings(max_new_tokens=STEPS)
    tokens, lengths, _ = decoding.decode_text(model, params, prefill(model, params, batch, STEPS),
                                              jax.random.key(0), settings)
    generated = np.zeros((2, STEPS), np.int32)  # causal: the slots not yet filled cannot matter
    prompt_len = batch["tokens"].shape[1]
    for k in range(STEPS):  # the reference: the whole sequence again for every token
        logits = full_outputs(model, params, batch, generated).logits[:, prompt_len - 1 + k]
        generated[:, k] = np.argmax(logits, -1)
    np.testing.assert_array_equal(np.asarray(tokens), generated)
    assert list(np.asarray(lengths)) == [STEPS, STEPS]


def test_cached_image_regression_equals_the_reference_rerun(setup):
    config, model, params = setup
    special, n = config.model.tokens, model.visual_tokens_per_image
    rows, batch = prompt_batch(config, model, [["t2", "img", "t3"]])
    batch["tokens"] = np.concatenate([batch["tokens"], [[special.img]]], 1)  # the prompt asks for an image
    batch["valid"] = np.concatenate([batch["valid"], [[1]]], 1)
    cached, state = decoding.regress_image(model, params, prefill(model, params, batch, n), count=n)
    positions = np.arange(batch["tokens"].shape[1])[None]
    reference = decoding.regress_image_uncached(model, params, batch["tokens"], positions, batch["valid"],
                                                batch["images"], count=n)
    assert cached.shape == (1, n, model.connector.target_width)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(reference), atol=1e-5, rtol=1e-4)
    assert int(state.cache.index) == batch["tokens"].shape[1] + n and int(state.position[0]) == len(rows[0]) + 1 + n
    # not a fixed point: the embeddings differ from one position to the next
    assert float(jnp.abs(cached[0, 1:] - cached[0, :-1]).max()) > 1e-3


def _computations(hlo: str) -> dict:
    """Compiled HLO text -> {computation name: its instruction lines}."""
    out, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = line.split("(", 1)[0].replace("ENTRY", "").strip().lstrip("%")
            out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line.strip())
    return out


def cache_sized_values(hlo: str, size: int, allowed=("dynamic-update-slice",)):
    """Instructions of the decoding loop's body that materialise an array of at least `size`
    elements, other than views and fusions built around an `allowed` op (an in-place update)."""
    computations = _computations(hlo)
    found = []
    for lines in computations.values():
        for line in lines:
            if "while/body" not in line or " = " not in line:
                continue
            shape, rest = line.split(" = ", 1)[1].split(" ", 1)
            opcode = rest.split("(", 1)[0]
            dims = shape[shape.find("[") + 1:shape.find("]")]
            if not dims or np.prod([int(d) for d in dims.split(",")]) < size:
                continue
            if opcode in ("bitcast", "get-tuple-element", "parameter", "tuple") + allowed:
                continue
            if opcode == "fusion":
                body = computations[line.split("calls=%", 1)[1].split(",", 1)[0]]
                if any(f" {op}(" in b for b in body for op in allowed):
                    continue
            found.append(line[:140])
    return found


@pytest.mark.parametrize("scan,batch_size", [(False, 1), (True, 3)])
def test_decoding_steps_do_not_copy_the_kv_cache(scan, batch_size):
    """Each step writes one position into each layer's keys and values in place, and attention reads
    them where they lie: no instruction of the compiled loop body copies a layer's cache. (They were
    re-stacked, and transposed for the score matmul, at every step: half a step's time on CPU; then
    an unscanned stack sliced its layers out of one stacked buffer: a quarter to a third.) A scanned stack
    indexes its layer with a traced index, so there a layer's keys and values may be sliced out."""
    config, model = tiny("emu2", scan_layers=scan)
    params = init_params(model)
    state = decoding.start(model, batch_size, 40)
    llm = model.llm
    layer_cache = batch_size * llm.kv_heads * 40 * llm.dim_per_head
    allowed = ("dynamic-update-slice", "dynamic-slice") if scan else ("dynamic-update-slice",)
    for loop in (decoding.regress_image.lower(model, params, state, count=4),
                 decoding.decode_text.lower(model, params, state, jax.random.key(0), TextSettings(max_new_tokens=4))):
        found = cache_sized_values(loop.compile().as_text(), layer_cache, allowed)
        assert not found, found


def test_left_padded_batch_equals_one_at_a_time(emu2):
    config, model, params = emu2
    layouts = [["t3", "img", "t6", "img", "t1"], ["t9"]]
    _, batch = prompt_batch(config, model, layouts)
    settings = TextSettings(max_new_tokens=STEPS)
    together, _, state = decoding.decode_text(model, params, prefill(model, params, batch, STEPS + 4),
                                              jax.random.key(0), settings)
    img = np.full((2, 1), config.model.tokens.img, np.int32)
    regressed, _ = decoding.regress_image(model, params, decoding.feed(model, params, state, img, np.ones_like(img)),
                                          count=2)
    for b in range(2):
        rows = batch["tokens"][b:b + 1, batch["valid"][b] == 1]
        images = batch["images"][b:b + 1, :max(1, layouts[b].count("img"))]
        alone = dict(tokens=rows, valid=np.ones_like(rows), images=images if layouts[b].count("img") else None)
        tokens, _, state_b = decoding.decode_text(model, params, prefill(model, params, alone, STEPS + 4),
                                                  jax.random.key(0), settings)
        np.testing.assert_array_equal(np.asarray(tokens)[0], np.asarray(together)[b])
        one = np.full((1, 1), config.model.tokens.img, np.int32)
        regressed_b, _ = decoding.regress_image(model, params, decoding.feed(model, params, state_b, one,
                                                                              np.ones_like(one)), count=2)
        np.testing.assert_allclose(np.asarray(regressed_b)[0], np.asarray(regressed)[b], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, -1.0])
def test_beam_search_with_one_beam_equals_greedy(emu2, length_penalty):
    config, model, params = emu2
    _, batch = prompt_batch(config, model, [["t3", "img", "t2"], ["img", "t5"]])
    state = prefill(model, params, batch, 12)
    greedy, _, _ = decoding.decode_text(model, params, state, jax.random.key(0), TextSettings(max_new_tokens=12))
    # a stop token greedy meets at step 3 of row 0: both must stop there
    stop = int(np.asarray(greedy)[0, 3])
    settings = TextSettings(max_new_tokens=12, stop_ids=(stop,))
    greedy, greedy_len, _ = decoding.decode_text(model, params, state, jax.random.key(0), settings)
    beam, beam_len, _ = decoding.beam_search(model, params, state, TextSettings(
        max_new_tokens=12, strategy="beam", num_beams=1, length_penalty=length_penalty, stop_ids=(stop,)))
    np.testing.assert_array_equal(np.asarray(beam_len), np.asarray(greedy_len))
    assert int(np.asarray(beam_len)[0]) <= 4
    for b in range(2):
        n = int(np.asarray(greedy_len)[b])
        np.testing.assert_array_equal(np.asarray(beam)[b, :n], np.asarray(greedy)[b, :n])


def test_beam_search_scores_are_those_of_the_sequences_it_returns(emu2):
    """Reordering the cache by parent beam is where beam search goes wrong: the reported score of
    each returned hypothesis must be its log-probability under a plain uncached run."""
    config, model, params = emu2
    _, batch = prompt_batch(config, model, [["t3", "img", "t2"], ["img", "t5"]])
    steps, penalty = 5, 0.5
    settings = TextSettings(max_new_tokens=steps, strategy="beam", num_beams=4, length_penalty=penalty)
    tokens, lengths, scores = decoding.beam_search(model, params, prefill(model, params, batch, steps), settings)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    assert list(lengths) == [steps, steps]  # no stop tokens: full length
    logits = full_outputs(model, params, batch, tokens[:, :-1]).logits[:, -steps:]
    log_probs = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(scores), log_probs.sum(1) / steps ** penalty, rtol=1e-4, atol=1e-4)
    greedy, _, _ = decoding.decode_text(model, params, prefill(model, params, batch, steps), jax.random.key(0),
                                        TextSettings(max_new_tokens=steps))
    greedy_logits = full_outputs(model, params, batch, np.asarray(greedy)[:, :-1]).logits[:, -steps:]  # same shape
    greedy_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(greedy_logits, -1)),
                                   np.asarray(greedy)[..., None], -1)[..., 0].sum(1)
    assert np.all(log_probs.sum(1) >= greedy_lp - 1e-4)  # four beams find at least greedy's path here


def test_sampling_rules(emu2):
    config, model, params = emu2
    _, batch = prompt_batch(config, model, [["t3", "img", "t2"], ["img", "t5"]])
    state = prefill(model, params, batch, STEPS)
    greedy, _, _ = decoding.decode_text(model, params, state, jax.random.key(0), TextSettings(max_new_tokens=STEPS))
    top1, _, _ = decoding.decode_text(model, params, state, jax.random.key(1), TextSettings(
        max_new_tokens=STEPS, strategy="sample", top_k=1, temperature=0.7))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    tiny_p, _, _ = decoding.decode_text(model, params, state, jax.random.key(2), TextSettings(
        max_new_tokens=STEPS, strategy="sample", top_p=1e-6))
    np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(greedy))
    wide = [np.asarray(decoding.decode_text(model, params, state, jax.random.key(s), TextSettings(
        max_new_tokens=STEPS, strategy="sample", temperature=5.0))[0]) for s in range(3)]
    assert not all(np.array_equal(w, wide[0]) for w in wide[1:])  # sampling samples
    # min_new_tokens: the first greedy token as a stop token may not end the rows at once
    stop = int(np.asarray(greedy)[0, 0])
    _, lengths, _ = decoding.decode_text(model, params, state, jax.random.key(0), TextSettings(
        max_new_tokens=STEPS, min_new_tokens=2, stop_ids=(stop,)))
    assert int(np.asarray(lengths)[0]) >= 2
    _, lengths, _ = decoding.decode_text(model, params, state, jax.random.key(0), TextSettings(
        max_new_tokens=STEPS, stop_ids=(stop,)))
    assert int(np.asarray(lengths)[0]) == 1
    with pytest.raises(ValueError, match="temperature > 0"):
        TextSettings(strategy="sample", temperature=0.0)


# ----------------------------------------------------------------------------- prompts

def test_prompt_syntax_places_inputs_and_requests(tmp_path, tokenizer):
    a = np.full((32, 32, 3), 10, np.uint8)
    path = str(tmp_path / "a.png")
    open(path, "wb").write(media.encode_png(a))
    segments = prompts.parse(f"<image:{path}> this is a dax. <image> this is a [IMG] after", 32, [a + 5])
    kinds = [type(s).__name__ if not isinstance(s, str) else s for s in segments]
    assert kinds == ["ImageInput", " this is a dax. ", "ImageInput", " this is a ", "ImageRequest", " after"]
    np.testing.assert_array_equal(segments[0].pixels, a)
    np.testing.assert_array_equal(segments[2].pixels, a + 5)
    assert [len(c) for c in prompts.split_at_requests(segments)] == [5, 1]
    with pytest.raises(prompts.PromptError, match="missing.png: not a readable image"):
        prompts.parse("<image:missing.png>", 32)
    with pytest.raises(prompts.PromptError, match="more <image> placeholders"):
        prompts.parse("<image> <image>", 32, [a])
    with pytest.raises(prompts.PromptError, match="no <image> placeholder left"):
        prompts.parse("text", 32, [a])
    assert prompts.emu_i_chat("<image>what is this?", system="Be brief.", history=(("hi", "hello"),)) == (
        "Be brief. [USER]: hi [ASSISTANT]: hello [USER]: <image>what is this? [ASSISTANT]:")


def test_few_shot_prompt_layout(tokenizer):
    config = load_config("tiny")
    special, n = config.model.tokens, 4
    images = [np.full((32, 32, 3), v, np.uint8) for v in (1, 2, 3)]
    from emu_jax.eval.tasks import Example, Task  # the sweep's few-shot prompt
    segments = Task().prompt([Example(0, [images[0]], target="this is a dax."),
                              Example(1, [images[1]], target="this is a wug.")], Example(2, [images[2]], question="this is a"))
    ids, placed = prompts.encode(segments, tokenizer, special, n, n)
    block = tokens_lib.image_block(special, n)
    expected = ([tokenizer.bos_id] + block + tokenizer.encode("this is a dax.") + block
                + tokenizer.encode("this is a wug.") + block + tokenizer.encode("this is a"))
    assert ids == expected
    assert [int(p[0, 0, 0]) for p in placed] == [1, 2, 3]  # images in the order of their blocks
    request, _ = prompts.encode(prompts.parse("a handwritten three[IMG]", 32), tokenizer, special, n, n)
    assert request == [tokenizer.bos_id] + tokenizer.encode("a handwritten three") + [special.img]


# ----------------------------------------------------------------------------- generator

# a decoder small enough to compile in seconds (the CLI gets the same overrides)
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """Random tiny Emu and decoder checkpoints, with the config naming the test tokenizer."""
    from emu_jax.models.visual_decoder import build_decoder, example_inputs
    import flax.linen as nn
    root = tmp_path_factory.mktemp("gen")
    config = small_decoder_config()
    with config.unlocked():
        config.data.tokenizer = tokenizer.model_path
        config.generate.max_new_tokens = 5
    _, model = tiny("emu2")
    save_params(root / "emu", init_params(model))
    decoder = build_decoder(config.model)
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(decoder))
    params = jax.jit(lambda k: nn.unbox(decoder.init(k, **inputs)["params"]))(init_key(1))
    save_params(root / "decoder", params, item="ema")
    return config, str(root / "emu"), str(root / "decoder")


def test_sharded_generation_equals_one_device(checkpoints, tokenizer):
    """fsdp=8 places every parameter on 8 devices; text and regressed embeddings match one device."""
    from emu_jax.generate.generator import Generator
    config, emu, _ = checkpoints
    batch = [prompts.parse("this is a <image> dax. [IMG] and", 32, [np.full((32, 32, 3), 9, np.uint8)]),
             prompts.parse("a handwritten [IMG] three", 32)]
    results = {}
    for fsdp in (1, 8):
        with config.unlocked():
            config.mesh.data, config.mesh.fsdp = 1, fsdp
        generator = Generator.from_checkpoints(config, emu, "", tokenizer)
        embed = generator.params["llm"]["embed_tokens"]["embedding"]
        assert len(embed.sharding.device_set) == fsdp
        results[fsdp] = generator.generate(batch)
    for one, sharded in zip(results[1], results[8]):
        assert one.text == sharded.text and len(one.embeddings) == len(sharded.embeddings) == 1
        assert one.pieces[0] is None and one.images == []  # no decoder: the image stays embeddings
        np.testing.assert_allclose(one.embeddings[0], sharded.embeddings[0], atol=1e-5)
    with pytest.raises(prompts.PromptError, match="prompt 1 asks for"):
        generator.generate([prompts.parse("a [IMG]", 32), prompts.parse("a", 32)])


def test_a_scanned_checkpoint_is_decoded_unscanned_with_the_same_outputs(checkpoints, tokenizer, tmp_path):
    """A checkpoint of a scanned LLaMA (the large configs' layout) is cut into per-layer arrays as
    it is restored, placed over the 8-device mesh as before (a scanned decoding step copies every
    layer's weights out of the stack on GPU); text and embeddings are those of decoding the stack
    as it lies."""
    import copy
    from emu_jax.generate.generator import Generator
    from emu_jax.models.emu import build_model
    config = copy.deepcopy(checkpoints[0])
    with config.unlocked():
        config.model.llm.scan_layers = True
        config.mesh.data, config.mesh.fsdp = 1, 1
    params = init_params(build_model(config.model))
    save_params(tmp_path / "scanned", params)
    batch = [prompts.parse("this is a <image> dax. [IMG] and", 32, [np.full((32, 32, 3), 9, np.uint8)]),
             prompts.parse("a handwritten [IMG] three", 32)]
    as_it_lies = Generator(config, params, tokenizer)
    assert as_it_lies.model.llm.scan_layers
    expected = as_it_lies.generate(batch)
    with config.unlocked():
        config.mesh.fsdp = 8
    generator = Generator.from_checkpoints(config, str(tmp_path / "scanned"), "", tokenizer)
    assert not generator.model.llm.scan_layers and "layers" not in generator.params["llm"]
    num_layers = config.model.llm.num_layers
    for i in range(num_layers):
        jax.tree.map(lambda cut, stack: np.testing.assert_array_equal(cut, stack[i]),
                     generator.params["llm"][f"layers_{i}"], params["llm"]["layers"])
    kernels = [x for x in jax.tree.leaves(generator.params["llm"]["layers_0"]) if x.ndim >= 2]
    assert kernels and all(len(x.sharding.device_set) == 8 for x in kernels)
    for ours, reference in zip(generator.generate(batch), expected):
        assert ours.text == reference.text and len(ours.embeddings) == len(reference.embeddings) == 1
        np.testing.assert_allclose(ours.embeddings[0], reference.embeddings[0], atol=1e-5)


def test_generate_cli_answers_with_text_and_an_image(checkpoints, tmp_path):
    config, emu, decoder = checkpoints
    image = tmp_path / "digit.png"
    image.write_bytes(media.encode_png(np.full((32, 32, 3), 200, np.uint8)))
    args = [sys.executable, "-m", "emu_jax.generate", f"--config={ROOT / 'configs' / 'tiny_decoder.py'}:decoder",
            f"--config.data.tokenizer={config.data.tokenizer}", f"--checkpoint={emu}", f"--decoder={decoder}",
            "--prompt=<image> this is a [IMG] and", f"--image={image}", f"--out={tmp_path / 'out'}",
            "--config.generate.strategy=beam", "--config.generate.num_beams=3", "--config.generate.max_new_tokens=4"]
    args += as_flags(SMALL_DECODER)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[0] " in done.stdout and "tokens/s" in done.stdout
    (result,) = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert result["prompt"] == "<image> this is a [IMG] and"
    assert result["images"] == [str(tmp_path / "out" / "prompt0_image0.png")]
    pixels = media.decode_image(open(result["images"][0], "rb").read(), 32)
    assert pixels.shape == (32, 32, 3)

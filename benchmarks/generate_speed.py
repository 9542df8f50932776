"""Generation speed, side by side on identical weights in one run.

    python benchmarks/generate_speed.py [--hidden=256 --layers=4 --limit_hidden=1024 --batches=1,4 --scan_layers]

1. Image embeddings: 64 visual embeddings regressed after a 256-token prompt, through the KV cache
   (`decoding.regress_image`: one prefill, then one position per step) vs the reference method
   (the whole sequence re-run for every new embedding, `decoding.regress_image_uncached`).
   Target: >= 20x, met in some runs here (20.1x) and not in others (16.5x): the re-run is
   compute-bound and the cached path dispatch-bound, and this shared CPU's speed moves the two
   apart (the causal query blocks of `layers._causal_xla_attention` make the re-run only 1.02-1.05x
   faster at these lengths, where attention is a small part of the work). Both are compiled first;
   the timings are the best of several calls.
2. One cached step against its hardware limit, measured in the same run: the step's weight matmuls
   alone (every LLaMA and connector matrix times one row, chained, in a jitted loop), whose time at
   batch 1 is reading the weights from memory; a real step also reads each layer's cached keys and
   values (+19% bytes at the defaults) and runs the norms, rotary and softmax. Measured at two sizes:
   the one above, whose weights (13 MiB) sit in this CPU's 32 MiB L3 cache, so the step's ~140 small
   kernels' dispatch dominates; and `--limit_hidden` (1024: 208 MiB of weights), beyond any L3 as
   every released model's weights are, where a step is bound by reading them. Target: <= 1.2 there.
3. Text: greedy tokens/s of our jitted decoding vs transformers' `LlamaForCausalLM.generate`
   (KV cache, greedy) on the same LLaMA (its weights imported into ours with the converter), the
   same prompts, the same number of new tokens, for each batch size. Target: >= 3x. Also prints
   how many generated tokens agree.
"""
import argparse
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from emu_jax import config_lib  # noqa: E402
from emu_jax.generate import decoding  # noqa: E402
from emu_jax.models.emu import build_model, example_inputs  # noqa: E402


def config_for(args):
    config = config_lib.load(os.path.join(ROOT, "configs", "tiny.py") + ":emu2")
    with config.unlocked():
        config.model.vit.update(image_size=64, patch_size=8)
        config.model.connector.pool_grid = 8  # 64 visual embeddings per image
        config.model.llm.update(hidden=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                                num_kv_heads=args.hidden // 64, mlp_hidden=args.hidden * 3, max_positions=1024,
                                scan_layers=args.scan_layers)
    return config


def timed(fn, repeats=10):
    """Best of `repeats` after a compiling call: this shared CPU's speed drifts by up to 2x over
    seconds, so the minimum is the stable figure."""
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _prompt(config, prompt_len):
    """A random prompt of `prompt_len` tokens ending in `[IMG]` (it asks for an image)."""
    tokens = np.random.RandomState(0).randint(3, 500, size=(1, prompt_len)).astype(np.int32)
    tokens[0, -1] = config.model.tokens.img
    return tokens


def image_embeddings(config, model, params, prompt_len, count):
    """Seconds for `count` embeddings, cached and re-run per position (best of several, interleaved)."""
    tokens = _prompt(config, prompt_len)
    valid = np.ones_like(tokens)
    positions = np.arange(prompt_len, dtype=np.int32)[None]

    def cached():
        state = decoding.feed(model, params, decoding.start(model, 1, prompt_len + count), tokens, valid)
        return decoding.regress_image(model, params, state, count=count)[0]

    def rerun():
        return decoding.regress_image_uncached(model, params, tokens, positions, valid, None, count=count)

    error = float(jnp.abs(cached() - rerun()).max())
    times = dict(cached=float("inf"), rerun=float("inf"))
    for _ in range(3):  # interleaved, so both sides see the same phases of this shared CPU's speed
        times["rerun"] = min(times["rerun"], timed(rerun, repeats=1))
        times["cached"] = min(times["cached"], timed(cached, repeats=5))
    return times, error


def step_and_limit(config, model, params, prompt_len, count):
    """Seconds per cached step (`count` of them after the prompt) and per pass of its weight matmuls alone."""
    tokens = _prompt(config, prompt_len)
    prefilled = decoding.feed(model, params, decoding.start(model, 1, prompt_len + count), tokens,
                              np.ones_like(tokens))
    steps = lambda: decoding.regress_image(model, params, prefilled, count=count)[0]  # noqa: E731
    hidden = config.model.llm.hidden  # as [in, out]: q/k/v [hidden, heads, head_dim], o [heads, head_dim, hidden]
    matrices = [w.reshape(hidden, -1) if w.shape[0] == hidden else w.reshape(-1, w.shape[-1])
                for tower in ("llm", "connector") for w in jax.tree.leaves(params[tower]) if w.ndim >= 2
                and w is not params["llm"]["embed_tokens"]["embedding"] and w is not params["llm"]["lm_head"]["kernel"]]
    limit = lambda: _matmuls_alone(matrices, count)  # noqa: E731
    times = dict(step=float("inf"), limit=float("inf"))
    for _ in range(3):  # interleaved, as above
        for name, fn in (("step", steps), ("limit", limit)):
            times[name] = min(times[name], timed(fn, repeats=5) / count)
    return times, sum(w.nbytes for w in matrices)


@partial(jax.jit, static_argnames="count")
def _matmuls_alone(matrices, count):
    width = max(max(w.shape) for w in matrices)

    def step(_, x):
        for w in matrices:
            y = x[:, :w.shape[0]] @ w
            x = jnp.pad(y, ((0, 0), (0, width - y.shape[1]))) * 0.5
        return x
    return jax.lax.fori_loop(0, count, step, jnp.ones((1, width), matrices[0].dtype))


def text_speed(config, model, params, batch, prompt_len, new_tokens):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from emu_jax.convert import importer, tensors
    llm = config.model.llm
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.mlp_hidden,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta, max_position_embeddings=llm.max_positions,
        tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    params = dict(params, **importer.to_params(tensors.from_state_dict(hf.state_dict()), "llama_hf", config))
    prompts = np.random.RandomState(1).randint(3, 500, size=(batch, prompt_len)).astype(np.int32)
    settings = decoding.TextSettings(max_new_tokens=new_tokens)  # no stop tokens: every row runs to the end

    def ours():
        state = decoding.feed(model, params, decoding.start(model, batch, prompt_len + new_tokens), prompts,
                              np.ones_like(prompts))
        return decoding.decode_text(model, params, state, jax.random.key(0), settings)[0]

    def theirs():
        with torch.no_grad():
            return hf.generate(torch.from_numpy(prompts.astype(np.int64)), attention_mask=torch.ones(prompts.shape),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=0, eos_token_id=None)[:, prompt_len:]

    agree = float((np.asarray(ours()) == theirs().numpy()).mean())
    ours_s = theirs_s = float("inf")
    for _ in range(4):  # interleaved, as above
        ours_s = min(ours_s, timed(ours, repeats=3))
        theirs_s = min(theirs_s, min(_wall(theirs) for _ in range(3)))
    return batch * new_tokens / ours_s, batch * new_tokens / theirs_s, agree


def _wall(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def built(args):
    """(config, model, random params) of the benchmark's Emu2 at `args`' LLaMA size."""
    import flax.linen as nn
    config = config_for(args)
    model = build_model(config.model)
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(model))
    params = jax.jit(lambda k: nn.unbox(model.init(k, **inputs)["params"]))(jax.random.key(0))
    return config, model, params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--limit_hidden", type=int, default=1024, help="the second size of the step / hardware "
                        "limit measurement: weights beyond the L3 cache")
    parser.add_argument("--batches", default="1,4", help="text batch sizes, comma-separated")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--scan_layers", action="store_true", help="LLaMA layers as one scanned stack (as the "
                        "large configs run)")
    args = parser.parse_args()
    config, model, params = built(args)
    print(f"device: {jax.devices()[0].device_kind}; LLaMA hidden {args.hidden}, {args.layers} "
          f"{'scanned' if args.scan_layers else 'unscanned'} layers, "
          f"vocab {config.model.llm.vocab_size}")

    times, error = image_embeddings(config, model, params, args.prompt_len, args.count)
    print(f"image embeddings ({args.count} after a {args.prompt_len}-token prompt): "
          f"cached {times['cached'] * 1e3:.1f} ms, "
          f"re-run per position {times['rerun'] * 1e3:.1f} ms -> speed-up {times['rerun'] / times['cached']:.1f}x "
          f"(target >= 20); max |difference| {error:.1e}")
    for hidden in (args.hidden, args.limit_hidden):
        sized = (config, model, params) if hidden == args.hidden else built(
            argparse.Namespace(**dict(vars(args), hidden=hidden)))
        times, weight_bytes = step_and_limit(*sized, args.prompt_len, args.count)
        print(f"one cached step, hidden {hidden} ({weight_bytes / 2**20:.0f} MiB of weights): "
              f"{times['step'] * 1e3:.2f} ms; its weight matmuls alone {times['limit'] * 1e3:.2f} ms "
              f"-> step / hardware limit {times['step'] / times['limit']:.2f}"
              + (" (target <= 1.2)" if hidden == args.limit_hidden else ""))
    for batch in map(int, args.batches.split(",")):
        ours, theirs, agree = text_speed(config, model, params, batch, 64, args.new_tokens)
        print(f"greedy text (batch {batch}, 64-token prompts, {args.new_tokens} new tokens): ours {ours:.0f} tokens/s, "
              f"transformers generate {theirs:.0f} tokens/s -> ratio {ours / theirs:.1f}x (target >= 3); "
              f"{agree:.0%} of generated tokens identical")


if __name__ == "__main__":
    main()

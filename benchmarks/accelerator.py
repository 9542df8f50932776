"""One-shot accelerator benchmark: every figure that needs a GPU (or TPU), measured in one short run.

    python benchmarks/accelerator.py --json=/tmp/accelerator.json     # one H100/H200 (see --budget_s)
    python benchmarks/accelerator.py --smoke --json=/tmp/accel.json   # tiny sizes, any CPU: 40-50 s on 2 busy cores
    python benchmarks/accelerator.py --readme_from=benchmarks/figures/accelerator.json  # its table into the README

On one H200 the full run took 235 s, compiles included (2026-11-30; the README has its table);
--budget_s skips the remaining train-step plans once the next would end past it.

Needs only jax (with its CUDA or TPU plugin), flax, optax, orbax-checkpoint and numpy; run it from a
checkout (it puts the checkout on sys.path; `pip install -e .` is not needed). No data, tokenizer,
grain, tensorflow-datasets, sentencepiece or ml_collections: the model is built from the attribute
dicts below, with random weights, tokens and uint8 images. One device is used.

What it measures, and against what (each figure beside its reference, in one table, and in --json):

1. bf16 matmul peak: `flops.measure_matmul_flops` (a jitted square matmul of side --matmul_size,
   best of 10), shown beside the datasheet dense bf16 peak (`flops.PEAK_FLOPS`) where the device is
   listed. This measured peak is the denominator of MFU below.
2. HBM bandwidth: a jitted `x + 1` over a --copy_gib GiB uint32 array (every byte read once and
   written once), best of 20: bytes moved / time. The denominator of the decoding limits below.
3. cuDNN vs XLA attention (GPU only; skipped elsewhere): the LLM's attention shape (--batch rows of
   two packed documents, padding in every other row, causal, bf16) through
   `layers.dot_product_attention` with "cudnn" and "xla": the outputs must agree elementwise within
   atol = rtol = 2e-2 and the gradients of their sum within atol = rtol = 5e-2 (bf16 tolerance; the
   gradients' as tests/test_models.py::test_cudnn_attention_equals_xla_on_gpu, whose check of the
   summed value alone is replaced by the elementwise one). Forward + backward times of both, and
   of cuDNN given the causal mask as a dense mask instead of is_causal (what it computed before).
4. Decoding: KV-cached greedy text (`decoding.decode_text`, --new_tokens after a --prompt_len
   prompt) in tokens/s, and image-embedding generation (`decoding.regress_image`: one image's 64
   regressed embeddings, each fed back) in embeddings/s, at each --decode_batches size, bf16 weights,
   with the LLM's layers unscanned (as the generator decodes a scanned checkpoint, cut apart by
   `layers.unstack`) and scanned (the stack as it lies). Against the
   weight-bandwidth limit: batch x HBM bandwidth / bytes of the weights one step reads (LLaMA without
   its embedding table; plus lm_head for text, plus the connector's projections for images). The
   limit counting the KV-cache reads as well is in the JSON (`limit_with_cache_per_s`).
5. Train step: the trainer's own step (`step.make_train_step`: forward, backward, global-norm
   clipping, AdamW from `optimizer.make_optimizer`; loss `losses.emu_loss`) of an Emu2-shaped model
   with ~1.0B parameters (LLaMA hidden 2048 x 16 layers, 16 heads of 128, SwiGLU 5632, Emu2's vocab
   32272; a post-norm EVA ViT-B/14 at 224 px; the pooled connector, 8x8 = 64 tokens per image),
   --batch rows of --seq_len 2048 tokens with --images image blocks each, bf16 compute, float32
   parameters and optimizer state (the trainer's mixed precision), scanned layers, attention "auto"
   (`layers.choose_attention`: cuDNN on GPU where it applies; the table says what each tower got),
   once per --remat policy (`layers.REMAT_POLICIES`, applied to both towers), and again with both
   towers' layers unrolled for the --unscanned policies. MFU = analytic model
   FLOPs of the step (`emu.train_flops`: 6 per matmul parameter per token plus attention; never
   counting recomputation) / best step time / the matmul peak of (1). Goal (issue #25): >= 0.6. A
   policy whose step does not fit in memory is reported as such; a policy is skipped when the time
   already spent plus the previous policy's time would pass --budget_s.

The JSON is rewritten after each section, so a run cut short still leaves what it measured. A
section that fails on a GPU with --attention (auto: cuDNN where it applies) is recorded and rerun
once with XLA attention, so a cuDNN problem costs one figure, not the device time. Exit status 1
when a section failed or cuDNN and XLA disagree (an out-of-memory remat policy is a result, not a
failure).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path[:0] = [ROOT, HERE]
import readme_section  # noqa: E402  (beside this file)
from emu_jax import tokens as tokens_lib  # noqa: E402
from emu_jax.generate import decoding  # noqa: E402
from emu_jax.models import layers  # noqa: E402
from emu_jax.models.emu import build_model, example_inputs, train_flops  # noqa: E402
from emu_jax.parallel import mesh as mesh_lib  # noqa: E402
from emu_jax.train import flops as flops_lib  # noqa: E402
from emu_jax.train.losses import emu_loss  # noqa: E402
from emu_jax.train.optimizer import make_optimizer  # noqa: E402
from emu_jax.train.step import TrainState, make_train_step  # noqa: E402


class Section(dict):
    """The few ConfigDict features `build_model`, `make_optimizer` and `train_flops` read (attribute
    access, `get`, `to_dict`), so that ml_collections is not needed."""
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Section) else v for k, v in self.items()}


# Model and run sizes. `full`: ~1.0B parameters (LLaMA 0.95B, ViT-B 86M); `smoke`: seconds on a CPU.
SIZES = {
    "full": dict(llm=dict(hidden=2048, num_layers=16, num_heads=16, mlp_hidden=5632),
                 vit=dict(image_size=224, patch_size=14, width=768, depth=12, num_heads=12, mlp_hidden=3072),
                 pool_grid=8, batch=8, seq_len=2048, images=2, steps=5, matmul_size=16384, copy_gib=4.0,
                 prompt_len=128, new_tokens=128, repeats=5),
    "smoke": dict(llm=dict(hidden=64, num_layers=2, num_heads=4, mlp_hidden=128),
                  vit=dict(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_hidden=64),
                  pool_grid=2, batch=2, seq_len=128, images=2, steps=2, matmul_size=256, copy_gib=1 / 64,
                  prompt_len=16, new_tokens=8, repeats=2),
}

# `config_lib.optimizer_config()`'s defaults (that module needs ml_collections), no freezing.
OPTIMIZER = Section(learning_rate=3e-4, warmup_steps=1000, decay="cosine", end_lr_fraction=0.1, b1=0.9, b2=0.95,
                    eps=1e-8, weight_decay=0.05, clip_norm=1.0,
                    no_decay=r"(norm|bias|scale|embedding|pos_embed|cls_token|causal_tokens)", freeze="",
                    lr_multipliers=())


def model_config(args, *, remat: str = "none", param_dtype: str = "float32", attention: str = "auto",
                 scan: bool = True) -> Section:
    """An Emu2-shaped `config.model`: post-norm EVA ViT, pooled connector, LLaMA, Emu2's tokens;
    scan: both towers' layers scanned (the large configs' layout), else unrolled."""
    special, vocab = tokens_lib.emu2_token_ids()
    return Section(
        vit=Section(**args.vit, post_norm=True, norm_eps=1e-6, pos_embed_grid=0, scan_layers=scan, remat=remat),
        connector=Section(kind="pooled", pool_grid=args.pool_grid, video_pool_grid=args.pool_grid),
        llm=Section(vocab_size=vocab, **args.llm, num_kv_heads=0, head_dim=0, norm_eps=1e-6, rope_theta=10000.0,
                    max_positions=max(args.seq_len, args.prompt_len + args.new_tokens), scan_layers=scan,
                    remat=remat),
        tokens=special, dtype="bfloat16", param_dtype=param_dtype, attention_impl=attention)


def init_params(model, seed: int = 0):
    """Parameters as the trainer creates them (jitted init, boxes removed), on the default device."""
    inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(model))
    return jax.jit(lambda key: nn.unbox(model.init(key, **inputs)["params"]))(jax.random.key(seed, impl="unsafe_rbg"))


def abstract_params(model):
    boxed = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw), example_inputs(model))["params"]
    return mesh_lib.strip_boxes(boxed)


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(best, median) seconds of `repeats` calls after one compiling call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ----------------------------------------------------------------------------- 1, 2: peaks

def measure_peaks(args) -> dict:
    kind = jax.devices()[0].device_kind
    matmul = flops_lib.measure_matmul_flops(args.matmul_size, jnp.bfloat16, repeats=10)
    datasheet = next((flops for prefix, flops in flops_lib.PEAK_FLOPS.items() if kind.startswith(prefix)), None)
    words = int(args.copy_gib * 2 ** 30) // 4
    x = jnp.ones((words,), jnp.uint32)
    add_one = jax.jit(lambda x: x + 1)  # one read and one write of every byte
    seconds, _ = best_time(functools.partial(add_one, x), 20)
    del x
    return {"matmul_size": args.matmul_size, "matmul_flops_per_s": matmul, "datasheet_flops_per_s": datasheet,
            "copy_bytes": 4 * words, "hbm_bytes_per_s": 2 * 4 * words / seconds}


# ----------------------------------------------------------------------------- 3: attention

def attention_check(args) -> dict:
    if jax.default_backend() != "gpu":
        return {"skipped": f"no GPU (backend {jax.default_backend()}): cuDNN kernels exist only on a GPU"}
    llm = args.llm
    b, t, h, d = args.batch, args.seq_len, llm["num_heads"], llm["hidden"] // llm["num_heads"]
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys)
    # two packed documents per row, and padding at the end of every other row
    segment_ids = np.where(np.arange(t) < t // 3, 1, 2) * np.ones((b, 1), np.int32)
    segment_ids[1::2, t - t // 8:] = 0
    mask = layers.SegmentMask(jnp.asarray(segment_ids, jnp.int32))

    def outputs_and_grads(implementation):
        def loss(q, k, v):
            out = layers.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
            return out.astype(jnp.float32).sum(), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def excess(x, ref, tol):  # > 0 where |x - ref| > tol + tol |ref| (numpy's assert_allclose)
        x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
        return float(jnp.max(jnp.abs(x - ref) - tol - tol * jnp.abs(ref)))

    runs = {impl: outputs_and_grads(impl) for impl in ("cudnn", "xla")}
    ((_, out), grads), ((_, ref_out), ref_grads) = (runs[impl](q, k, v) for impl in ("cudnn", "xla"))
    out_excess = excess(out, ref_out, 2e-2)
    grad_excess = max(excess(g, r, 5e-2) for g, r in zip(grads, ref_grads))
    times = {impl: best_time(lambda fn=fn: fn(q, k, v), args.repeats)[0] for impl, fn in runs.items()}

    def dense_mask_loss(q, k, v):  # cuDNN given the causal segment mask as a dense mask (not told it is causal)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="cudnn")
        return out.astype(jnp.float32).sum()
    dense = jax.jit(jax.value_and_grad(dense_mask_loss, argnums=(0, 1, 2)))
    times["cudnn_dense_mask"] = best_time(lambda: dense(q, k, v), args.repeats)[0]
    return {"shape": [b, t, h, d], "auto_chooses": layers.choose_attention("auto", q, k, mask, None),
            "output_max_abs_error": float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32)))),
            "grad_max_abs_error": max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                                      for g, r in zip(grads, ref_grads)),
            "passed": bool(out_excess <= 0 and grad_excess <= 0), "cudnn_s": times["cudnn"], "xla_s": times["xla"],
            "cudnn_dense_mask_s": times["cudnn_dense_mask"]}


# ----------------------------------------------------------------------------- 4: decoding

def decode_speed(args, bandwidth: float, attention: str) -> list[dict]:
    """Each layout: "unscanned" as the generator decodes a scanned checkpoint (its stacked layers cut
    apart by `layers.unstack`), "scanned" as the checkpoint lies."""
    results = []
    for layout in ("unscanned", "scanned"):
        results += _decode_speed(args, bandwidth, attention, layout)
    return results


def _decode_speed(args, bandwidth: float, attention: str, layout: str) -> list[dict]:
    config = model_config(args, param_dtype="bfloat16", attention=attention)
    model = build_model(config)
    params = init_params(model)  # scanned, as the large configs' checkpoints are
    if layout == "unscanned":
        config = model_config(args, param_dtype="bfloat16", attention=attention, scan=False)
        model = build_model(config)
        params = dict(params, llm=layers.unstack(params["llm"], "layers", release=True))
    llm = {k: v for k, v in params["llm"].items() if k != "embed_tokens"}  # a step gathers one row of the table
    text_bytes = tree_bytes(llm)
    image_bytes = tree_bytes({k: v for k, v in llm.items() if k != "lm_head"}) + tree_bytes(params["connector"])
    count = model.visual_tokens_per_image
    cache_len = args.prompt_len + max(args.new_tokens, count)
    m = model.llm
    settings = decoding.TextSettings(max_new_tokens=args.new_tokens)  # no stop ids: every row runs to the end
    results = []
    for batch in args.decode_batches:
        cache_bytes = 2 * m.num_layers * batch * m.kv_heads * cache_len * m.dim_per_head * 2  # k and v, bf16
        tokens = np.random.RandomState(batch).randint(3, 30000, size=(batch, args.prompt_len)).astype(np.int32)
        tokens[:, -1] = config.tokens["img"]  # the prompt asks for an image (text decoding ignores that)
        state = decoding.feed(model, params, decoding.start(model, batch, cache_len), tokens, np.ones_like(tokens))
        text_s, _ = best_time(lambda: decoding.decode_text(model, params, state, jax.random.key(0), settings)[0],
                              args.repeats)
        image_s, _ = best_time(lambda: decoding.regress_image(model, params, state, count=count)[0], args.repeats)
        for what, seconds, steps, weight_bytes in (("text tokens", text_s, args.new_tokens, text_bytes),
                                                   ("image embeddings", image_s, count, image_bytes)):
            results.append({"what": what, "layout": layout, "batch": batch, "attention": attention, "steps": steps,
                            "seconds": seconds,
                            "per_s": batch * steps / seconds, "weight_bytes": weight_bytes,
                            "cache_bytes": cache_bytes, "limit_per_s": batch * bandwidth / weight_bytes,
                            "limit_with_cache_per_s": batch * bandwidth / (weight_bytes + cache_bytes)})
    return results


# ----------------------------------------------------------------------------- 5: train step

class BenchTask:
    """What `make_train_step` needs of a task: `tasks.EmuTask`'s loss, norms and counters (`tasks`
    imports the Grain pipeline)."""

    def __init__(self, model):
        self.model = model

    def loss(self, params, batch, rng, norms, step=None):
        del rng, step
        out = self.model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                               batch["images"])
        return emu_loss(out, batch, text_weight=1.0, regression_weight=1.0, norms=norms)

    def loss_norms(self, batch):
        return batch["text_mask"].sum(), batch["regression_mask"].sum()

    def counters(self, batch) -> dict:
        return dict(tokens=(batch["segment_ids"] > 0).sum(), images=jnp.int32(batch["images"].shape[0] *
                                                                                batch["images"].shape[1]))


def random_batch(args, config, model) -> dict:
    """Rows of random text with `args.images` image blocks each, one document per row."""
    rng = np.random.RandomState(0)
    special, b, t, n = config.tokens, args.batch, args.seq_len, args.images
    block = tokens_lib.image_block(special, model.visual_tokens_per_image)
    tokens = rng.randint(3, 30000, size=(b, t)).astype(np.int32)
    for i in range(n):
        start = 1 + i * (len(block) + 16)
        tokens[:, start:start + len(block)] = block
    segments = np.ones((b, t), np.int32)
    text_mask, regression_mask = tokens_lib.loss_masks(tokens, segments, special)
    size = config.vit.image_size
    images = rng.randint(0, 256, (b, n, size, size, 3)).astype(np.uint8)
    return jax.device_put({"tokens": tokens, "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                           "segment_ids": segments, "images": images, "text_mask": text_mask,
                           "regression_mask": regression_mask})


def train_speed(args, remat: str, peaks: dict, attention: str, scan: bool = True) -> dict:
    config = model_config(args, remat=remat, attention=attention, scan=scan)
    model = build_model(config)
    abstract = abstract_params(model)
    tokens_per_image = model.vit.num_tokens
    chosen = {tower: layers.choose_attention(attention, *(jax.ShapeDtypeStruct((1, t, 1, d), jnp.bfloat16),) * 2,
                                                layers.SegmentMask(jnp.zeros((1, t), jnp.int32)), None)
                 for tower, t, d in (("llm", args.seq_len, model.llm.dim_per_head),
                                     ("vit", tokens_per_image, model.vit.width // model.vit.num_heads))}
    row = {"remat": remat, "layers": "scanned" if scan else "unscanned", "batch": args.batch, "seq_len": args.seq_len,
           "images_per_row": args.images, "parameters": int(sum(x.size for x in jax.tree.leaves(abstract))),
           "attention": chosen}
    row["model_flops"] = train_flops(abstract, config, args.batch, args.seq_len, args.images)
    state = None
    try:
        optimizer = make_optimizer(OPTIMIZER, abstract, 1000)
        params = init_params(model)
        state = TrainState(jnp.int32(0), params, jax.jit(optimizer.tx.init)(params), jnp.int32(0))
        del params
        batch = random_batch(args, config, model)
        start = time.perf_counter()
        step = jax.jit(make_train_step(BenchTask(model), optimizer), donate_argnums=0).lower(state, batch).compile()
        row["compile_s"] = time.perf_counter() - start
        memory = step.memory_analysis()
        if memory is not None:
            row["step_memory_bytes"] = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes +
                                           memory.output_size_in_bytes - memory.alias_size_in_bytes)
        state, metrics, times = flops_lib.time_train_steps(step, state, batch, args.steps)
        row.update(step_s=min(times), median_step_s=float(np.median(times)), loss=float(metrics["loss"]),
                   tokens_per_s=args.batch * args.seq_len / min(times))
        row["model_flops_per_s"] = row["model_flops"] / row["step_s"]
        row["mfu"] = row["model_flops_per_s"] / peaks["matmul_flops_per_s"]
        if peaks.get("datasheet_flops_per_s"):
            row["mfu_vs_datasheet"] = row["model_flops_per_s"] / peaks["datasheet_flops_per_s"]
    except Exception as error:  # noqa: BLE001  (out of memory is a result; anything else is reported too)
        if not is_out_of_memory(error):
            raise
        row["out_of_memory"] = str(error).splitlines()[0][:300]
    finally:
        del state
    return row


# ----------------------------------------------------------------------------- the table

def si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def table(result: dict) -> str:
    rows = []
    peaks = result.get("peaks")
    if peaks:
        sheet = peaks["datasheet_flops_per_s"]
        rows.append((f"bf16 matmul {peaks['matmul_size']}^2", si(peaks["matmul_flops_per_s"], "FLOP/s"),
                     f"datasheet {si(sheet, 'FLOP/s')}" if sheet else "datasheet: device not listed",
                     f"{peaks['matmul_flops_per_s'] / sheet:.2f}" if sheet else ""))
        rows.append((f"HBM: x + 1 over {peaks['copy_bytes'] / 2 ** 30:.3g} GiB", si(peaks["hbm_bytes_per_s"], "B/s"),
                     "(the decoding limits' bandwidth)", ""))
    attention = result.get("attention")
    if attention and "skipped" in attention:
        rows.append(("cuDNN vs XLA attention", "skipped", attention["skipped"], ""))
    elif attention:
        rows.append((f"cuDNN vs XLA attention {attention['shape']} (auto: {attention['auto_chooses']})",
                     "PASS" if attention["passed"] else "FAIL",
                     f"outputs max err {attention['output_max_abs_error']:.1e} (tol 2e-2 + 2e-2 x ref); gradients "
                     f"{attention['grad_max_abs_error']:.1e} (tol 5e-2 + 5e-2 x ref)",
                     f"cuDNN {attention['cudnn_s'] * 1e3:.2f} ms "
                     f"(dense mask: {attention['cudnn_dense_mask_s'] * 1e3:.2f}), "
                     f"XLA {attention['xla_s'] * 1e3:.2f} ms fwd+bwd"))
    for d in result.get("decode", []):
        unit = "tokens/s" if d["what"] == "text tokens" else "embeddings/s"
        rows.append((f"decode {d['what']}, batch {d['batch']}, {d['layout']} layers, attn {d['attention']}",
                     f"{d['per_s']:.4g} {unit}",
                     f"weight-bandwidth limit {d['limit_per_s']:.4g} ({d['weight_bytes'] / 2 ** 20:.0f} MiB/step)",
                     f"{d['per_s'] / d['limit_per_s']:.2f}"))
    for t in result.get("train", []):
        if "skipped" in t:
            rows.append((f"train step remat={t['remat']}, {t['layers']} layers", "skipped", t["skipped"], ""))
            continue
        name = (f"train step remat={t['remat']}, {t['layers']} layers, {si(t['parameters'], 'params')}, "
                f"{t['batch']}x{t['seq_len']}, attn llm {t['attention']['llm']} / vit {t['attention']['vit']}")
        if "out_of_memory" in t:
            rows.append((name, "out of memory", "", ""))
        else:
            rows.append((name, f"{t['step_s'] * 1e3:.1f} ms ({si(t['tokens_per_s'], 'tok/s')}, "
                         f"compile {t['compile_s']:.0f} s)",
                         f"{si(t['model_flops'], 'FLOP')} model / measured matmul peak", f"MFU {t['mfu']:.3f}"))
    for section, error in result.get("errors", {}).items():
        rows.append((section, "ERROR", error[:120], ""))
    header = ("figure", "measured", "against", "ratio")
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    lines = [f"{result['device']}, {result['date'][:10]}; {versions}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:4]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU, under a minute); checks the script")
    parser.add_argument("--json", default="", help="write the results here (rewritten after each section)")
    parser.add_argument("--readme_from", default="",
                        help="measure nothing: write this --json's table into the README (accelerator-table)")
    parser.add_argument("--remat", default="",
                        help=f"comma-separated remat policies to time the train step with, of "
                             f"{list(layers.REMAT_POLICIES)}; default none,dots_no_batch,full (--smoke: none,full)")
    parser.add_argument("--unscanned", default="none,dots_no_batch",
                        help="remat policies of --remat to time again with both towers' layers unrolled")
    parser.add_argument("--attention", default="auto", choices=layers.ATTENTION_IMPLEMENTATIONS,
                        help="the models' attention_impl (a GPU section that fails with it is rerun with xla)")
    parser.add_argument("--skip", default="", help="comma-separated sections not to run, of attention, decode, train "
                                                    "(a rerun of what failed; the peaks are always measured)")
    parser.add_argument("--decode_batches", default="1,16", help="comma-separated decoding batch sizes")
    parser.add_argument("--budget_s", type=float, default=420.0,
                        help="skip a remat policy whose run (estimated by the previous one's) would end past this")
    for name in ("batch", "seq_len", "images", "steps", "matmul_size", "prompt_len", "new_tokens", "repeats"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the size's {name}")
    parser.add_argument("--copy_gib", type=float, default=None, help="override the size's copy_gib")
    args = parser.parse_args(argv)
    if args.readme_from:
        with open(args.readme_from) as f:
            markdown = table(json.load(f))
        readme_section.rewrite(os.path.join(ROOT, "README.md"), "accelerator-table", markdown)
        print(markdown)
        return 0
    for key, value in SIZES["smoke" if args.smoke else "full"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"attention", "decode", "train"}:
        parser.error(f"--skip: unknown sections {sorted(skip - {'attention', 'decode', 'train'})}")
    remats = (args.remat or ("none,full" if args.smoke else "none,dots_no_batch,full")).split(",")
    unscanned = [r for r in args.unscanned.split(",") if r]
    unknown = [r for r in remats + unscanned if r not in layers.REMAT_POLICIES]
    if unknown:
        parser.error(f"unknown remat policies {unknown}; choose from {list(layers.REMAT_POLICIES)}")
    plans = [(remat, True) for remat in remats] + [(remat, False) for remat in unscanned if remat in remats]

    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Before JAX starts its backend: unoptimised codegen halves the tiny steps' compile time on a
        # CPU (the smoke run checks the script; its timings mean nothing).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    begin = time.perf_counter()
    device = jax.devices()[0]
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{device.device_kind} ({device.platform})", "smoke": args.smoke,
              "versions": {name: importlib.metadata.version(name)
                           for name in ("jax", "jaxlib", "flax", "optax", "numpy")},
              "sizes": {k: getattr(args, k) for k in SIZES["full"]}, "errors": {}}

    def save(section: str):
        result["elapsed_s"] = time.perf_counter() - begin
        print(f"[{result['elapsed_s']:6.1f} s] {section} done", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    def run(section: str, fn, attention: str | None = None):
        """fn(attention); a failure is recorded, and a model section's retried once on a GPU with XLA
        attention (so that a cuDNN problem costs one figure, not the run's time on the device)."""
        label = section if attention is None else f"{section} (attention {attention})"
        try:
            return fn(attention)
        except Exception as error:  # noqa: BLE001  (one failed section must not lose the others)
            first_line = str(error).splitlines()[0] if str(error) else ""
            result["errors"][label] = f"{type(error).__name__}: {first_line}"
            print(f"{label} failed: {result['errors'][label]}", file=sys.stderr, flush=True)
        if attention not in (None, "xla") and jax.default_backend() == "gpu":
            return run(section, fn, "xla")
        return None

    print(f"device: {result['device']}; {'smoke sizes' if args.smoke else 'full sizes'}", flush=True)
    result["peaks"] = run("matmul peak and HBM bandwidth", lambda _: measure_peaks(args))
    save("matmul peak and HBM bandwidth")
    peaks = result["peaks"] or {"matmul_flops_per_s": float("nan"), "hbm_bytes_per_s": float("nan")}
    if "attention" not in skip:
        result["attention"] = run("cuDNN vs XLA attention", lambda _: attention_check(args))
        save("cuDNN vs XLA attention")
    if "decode" not in skip:
        result["decode"] = run("decoding", lambda attention: decode_speed(args, peaks["hbm_bytes_per_s"], attention),
                               args.attention) or []
        save("decoding")
    result["train"], last = [], 0.0
    for remat, scan in plans if "train" not in skip else ():
        label = f"remat={remat}{'' if scan else ', unscanned'}"
        start = time.perf_counter()
        if start - begin + last > args.budget_s:
            result["train"].append({"remat": remat, "layers": "scanned" if scan else "unscanned",
                                    "skipped": f"time budget --budget_s={args.budget_s:g}"})
            continue
        row = run(f"train {label}", lambda attention: train_speed(args, remat, peaks, attention, scan),
                  args.attention)
        if row is not None:
            result["train"].append(row)
        last = time.perf_counter() - start
        save(f"train step, {label}")
    print(table(result))
    return 1 if result["errors"] or not (result.get("attention") or {}).get("passed", True) else 0


if __name__ == "__main__":
    sys.exit(main())

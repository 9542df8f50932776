"""Conversion throughput and peak memory on a synthetic multi-GB LLaMA checkpoint.

    python benchmarks/convert_throughput.py [--hidden=2048 --layers=8 --vocab=32000] [--workdir=/tmp/convert_bench]

Writes a Hugging Face LLaMA-layout safetensors file (random float32 tensors, streamed), then in
one run and each in its own process: a raw read of every tensor of that file (safetensors,
memory-mapped, each tensor copied out once), and `python -m emu_jax.convert import` of the same
file into a sharded Orbax checkpoint. Prints the conversion throughput beside the raw read's
(ratio; target >= 0.5) and the conversion's peak RSS beside the largest tensor (target <= 2x + 1 GiB).
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from emu_jax.convert.tensors import write_safetensors  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def llama_shapes(hidden, layers, mlp, vocab):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                   p + "mlp.down_proj.weight": (hidden, mlp), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes


CONVERT = """
import sys, time
from absl import flags
from emu_jax import config_lib
from emu_jax.convert import importer, tensors
from emu_jax.parallel import mesh as mesh_lib
config = config_lib.load(sys.argv[1])
with config.unlocked():
    config.model.llm.update(eval(sys.argv[2]))
    config.mesh.data, config.mesh.fsdp = 1, -1
source = tensors.open_source(sys.argv[3])
start = time.perf_counter()
importer.import_checkpoint(source, "llama_hf", config, sys.argv[4], mesh=mesh_lib.make_mesh(config.mesh), progress=False)
print(time.perf_counter() - start)
"""

RAW_READ = """
import sys, time
from safetensors import safe_open
start = time.perf_counter()
total = 0
with safe_open(sys.argv[1], framework="numpy") as f:
    for key in f.keys():
        total += f.get_tensor(key).nbytes
print(time.perf_counter() - start, total)
"""


def run_child(code: str, *args) -> tuple[str, float]:
    """(stdout, peak RSS in GiB of the largest child so far)."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    shapes = llama_shapes(args.hidden, args.layers, args.mlp, args.vocab)
    rng = np.random.default_rng(0)
    path = os.path.join(args.workdir, "llama.safetensors")
    size = write_safetensors(path, [(k, s, "float32", lambda s=s: rng.standard_normal(s, np.float32) * 0.02)
                                    for k, s in shapes.items()])
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    heads = args.hidden // 128
    llm = dict(hidden=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=heads, mlp_hidden=args.mlp,
               vocab_size=args.vocab)
    run_child(RAW_READ, path)  # warms the page cache for both contenders
    # the conversion runs before the second read: RUSAGE_CHILDREN reports the largest child so far
    out, convert_rss = run_child(CONVERT, os.path.join(ROOT, "configs", "tiny.py") + ":emu2", repr(llm), path,
                                 os.path.join(args.workdir, "ours"))
    convert_wall = float(out.split()[-1])
    read_seconds = float(run_child(RAW_READ, path)[0].split()[0])
    gib = size / 2**30
    print(f"checkpoint: {len(shapes)} tensors, {gib:.2f} GiB float32, largest tensor {largest / 2**30:.2f} GiB")
    print(f"raw safetensors read : {gib / read_seconds:7.2f} GiB/s ({read_seconds:.1f} s)")
    print(f"convert (import)     : {gib / convert_wall:7.2f} GiB/s ({convert_wall:.1f} s, read + transform + "
          f"shard + Orbax write, after start-up)")
    print(f"throughput ratio convert / raw read: {read_seconds / convert_wall:.2f} (target >= 0.5)")
    print(f"peak RSS of the conversion: {convert_rss:.2f} GiB = {convert_rss / (largest / 2**30):.2f} x largest tensor "
          f"(target <= 2 x {largest / 2**30:.2f} + 1 = {2 * largest / 2**30 + 1:.2f} GiB)")


if __name__ == "__main__":
    main()

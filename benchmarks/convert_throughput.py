"""Conversion throughput and peak memory on a synthetic multi-GB LLaMA checkpoint.

    python benchmarks/convert_throughput.py [--hidden=2048 --layers=8 --vocab=32000] [--workdir=/tmp/convert_bench]
                                            [--memory_dir=/dev/shm/convert_bench --repeats=3]

Writes a Hugging Face LLaMA-layout safetensors file (random float32 tensors, streamed), then, each
in its own process: a raw read of every tensor of that file (safetensors, memory-mapped, each tensor
copied out once); `python -m emu_jax.convert import` of the same file into a sharded Orbax checkpoint;
and the ceiling the conversion cannot beat: Orbax writing the same bytes, already placed on the same
shards, with the same settings. The last two are timed to two destinations, best of `--repeats`,
interleaved:
- the disk under `--workdir`, until `os.sync()` returns (so each pays for its own writeback, and the
  figure is "on the disk", not "in the page cache", which swings 2x with the dirty pages left over);
  target: convert / Orbax write alone >= 0.9 (reading and transforming hide behind the writer);
- a tmpfs (`--memory_dir`), a writer at memory speed: there the conversion's own passes over the
  bytes (read, transpose, place) are the limit, and the ratio shows what they cost.
Also the conversion's peak RSS beside the largest tensor (target <= 2x + 1 GiB).
"""
import argparse
import os
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
import os, resource, sys, time
from absl import flags
from emu_jax import config_lib
from emu_jax.convert import importer, tensors
from emu_jax.parallel import mesh as mesh_lib
config = config_lib.load(sys.argv[1])
with config.unlocked():
    config.model.llm.update(eval(sys.argv[2]))
    config.mesh.data, config.mesh.fsdp = 1, -1
source = tensors.open_source(sys.argv[3])
os.sync()  # no earlier contender's writes still in flight
start = time.perf_counter()
importer.import_checkpoint(source, "llama_hf", config, sys.argv[4], mesh=mesh_lib.make_mesh(config.mesh), progress=False)
os.sync()  # counted: the bytes are on the disk
print(time.perf_counter() - start)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""

ORBAX_WRITE = """
import os, sys, time, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint.experimental import v1 as ocp_v1
from emu_jax.convert import tensors
source = tensors.open_source(sys.argv[1])
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
def place(a):
    spec = P("fsdp") if a.ndim and a.shape[0] % len(jax.devices()) == 0 else P()
    return jax.device_put(np.array(a), NamedSharding(mesh, spec))
tree = {k.replace(".", "_"): place(source.read(k)) for k in source.keys()}
context = ocp_v1.Context()
context.array.saving.use_compression = False
os.sync()
start = time.perf_counter()
with context:
    ocp_v1.save_pytree(sys.argv[2], tree)
os.sync()
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
print(time.perf_counter() - start)
"""


def run_child(code: str, *args) -> list[float]:
    """The numbers the child prints."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu",
                                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8")))
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return [float(x) for x in done.stdout.split()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default="/tmp/convert_bench", help="the source file and the disk destination")
    parser.add_argument("--memory_dir", default="/dev/shm/convert_bench" if os.path.isdir("/dev/shm") else "",
                        help="a memory-backed destination (tmpfs); empty: none")
    parser.add_argument("--repeats", type=int, default=3)
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
    run_child(RAW_READ, path)  # warms the page cache for every contender
    read_seconds = run_child(RAW_READ, path)[0]
    gib = size / 2**30
    print(f"checkpoint: {len(shapes)} tensors, {gib:.2f} GiB float32, largest tensor {largest / 2**30:.2f} GiB")
    print(f"raw safetensors read : {gib / read_seconds:7.2f} GiB/s ({read_seconds:.1f} s)")
    destinations = {"disk": args.workdir}
    if args.memory_dir:
        destinations["memory"] = args.memory_dir
    rss = 0.0
    for name, directory in destinations.items():
        best = dict(convert=float("inf"), orbax=float("inf"))
        for _ in range(args.repeats):  # interleaved: both see the same phases of this shared machine
            for out in ("ours", "orbax_alone"):
                shutil.rmtree(os.path.join(directory, out), ignore_errors=True)
            seconds, peak = run_child(CONVERT, os.path.join(ROOT, "configs", "tiny.py") + ":emu2", repr(llm),
                                      path, os.path.join(directory, "ours"))
            best["convert"], rss = min(best["convert"], seconds), max(rss, peak)
            best["orbax"] = min(best["orbax"], run_child(ORBAX_WRITE, path, os.path.join(directory, "orbax_alone"))[0])
        shutil.rmtree(directory if name == "memory" else os.path.join(directory, "ours"), ignore_errors=True)
        print(f"to {name:6} ({directory}): convert {gib / best['convert']:5.2f} GiB/s ({best['convert']:.1f} s), "
              f"Orbax write alone {gib / best['orbax']:5.2f} GiB/s ({best['orbax']:.1f} s) -> ratio convert / Orbax "
              f"write alone: {best['orbax'] / best['convert']:.2f}{' (target >= 0.9)' if name == 'disk' else ''}; "
              f"convert / raw read: {read_seconds / best['convert']:.2f}")
    print(f"peak RSS of the conversion process: {rss:.2f} GiB = {rss / (largest / 2**30):.2f} x largest tensor "
          f"(target <= 2 x {largest / 2**30:.2f} + 1 = {2 * largest / 2**30 + 1:.2f} GiB)")


if __name__ == "__main__":
    main()

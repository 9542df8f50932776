"""Does the TPU compiler's step-time estimate rank remat policies as a measured step does? One run:

    python benchmarks/remat_cost_check.py [--policies=none,dots_no_batch,save_attention,save_qkv,full]

`train_compile --search` ranks plans by the TPU compiler's estimated step time (`optimal_seconds`).
No TPU is at hand to time them, so this checks what can be checked here: the same step
(configs/small.py's train step, float32, 4 rows x 512 tokens, 2 images per row, layers unrolled)
under each remat policy (both towers), compiled for a 4-chip TPU slice (a row per chip; libtpu
took over 10 minutes compiling it for a single chip) and costed by the compiler, and compiled for
this CPU (one device, the 4 rows) and timed (best of --steps). Prints each policy's step time
relative to no remat, estimated and measured, side by side (absolute times are not comparable:
different hardware), and writes the table between the README's `<!-- remat-check:begin -->` /
`<!-- remat-check:end -->` markers.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_section  # noqa: E402
from train_step_flops import measured_step  # noqa: E402

from emu_jax import config_lib  # noqa: E402
from emu_jax.train import aot  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
BATCH, SEQ_LEN, IMAGES = 4, 512, 2


def policy_config(policy: str):
    return config_lib.with_overrides(config_lib.load(str(ROOT / "configs" / "small.py")), {
        "model.vit.remat": policy, "model.llm.remat": policy, "data.global_batch_size": BATCH,
        "data.seq_len": SEQ_LEN, "data.max_images": IMAGES, "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="none,dots_no_batch,save_attention,save_qkv,full")
    parser.add_argument("--target", default="v5p:2x2x1", help="The TPU slice the compiler estimates for.")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    rows = []
    for policy in args.policies.split(","):
        config = policy_config(policy)
        estimated = aot.compile_report(config, args.target, extrapolate=False).compiler_seconds
        measured = min(measured_step(config, BATCH, SEQ_LEN, IMAGES, args.steps)[0])
        rows.append((policy, estimated, measured))
        print(f"{policy}: estimated {estimated * 1e3:.2f} ms on {args.target}, measured {measured * 1e3:.0f} ms",
              flush=True)
    _, base_estimate, base_measured = rows[0]
    lines = [f"| remat (both towers) | TPU estimate ({args.target}) / {rows[0][0]} | measured CPU step / {rows[0][0]} |",
             "|---|---|---|"]
    lines += [f"| {p} | {e / base_estimate:.2f} | {m / base_measured:.2f} |" for p, e, m in rows]
    lines.append(f"\nconfigs/small.py, float32, {BATCH} x {SEQ_LEN} tokens, {IMAGES} images per row; CPU: "
                 f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}.")
    table = "\n".join(lines)
    print(table)
    readme_section.rewrite(args.readme, "remat-check", table)


if __name__ == "__main__":
    main()

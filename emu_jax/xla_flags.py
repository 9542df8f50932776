"""XLA flags the train CLI sets, before JAX starts its backend, for convolution-heavy tasks.

XLA's CPU backend routes convolutions and matmuls through YNNPACK fusions by default. On the
2-core CPU this project is developed on, turning them off runs the decoder's convolutions about
2.5x faster (forward + backward of the tiny VAE: 1.45 s -> 0.57 s) but the LLM's large matmuls
about 8% slower (configs/small.py train step: 83 -> 77 GFLOP/s), so only the decoder tasks
(`vae`, `decoder`) get it. The flag concerns only the CPU backend; an explicit setting in
XLA_FLAGS wins.
"""
import os

CONVOLUTION_TASKS = ("vae", "decoder")
CPU_CONVOLUTION_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_defaults(task: str = "decoder") -> None:
    if task not in CONVOLUTION_TASKS:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_CONVOLUTION_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags

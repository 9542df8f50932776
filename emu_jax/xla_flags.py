"""XLA flags the command-line entry points set before JAX starts its backend.

XLA's CPU backend routes convolutions and matmuls through YNNPACK fusions by default; on the
2-core CPU this project is developed on they run our convolutions about 2.5x slower than XLA's
own emitters (forward + backward of the tiny VAE: 1.45 s with, 0.57 s without) and matmuls no
faster. The flag only concerns the CPU backend; an explicit setting in XLA_FLAGS wins.
"""
import os

CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_defaults() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_DEFAULTS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags

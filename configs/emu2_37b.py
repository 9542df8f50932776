"""Emu2 (37B): EVA-02-CLIP-E/14+ (448 px, post-norm) + 8x8 pooled connector + LLaMA-33B.

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu2_37b.py
"""
from emu_jax import config_lib


def get_config(arg=None):
    config_lib.parse_variant(arg, ("base",))
    config = config_lib.emu2_config()
    config.model.dtype = "bfloat16"
    config.lock()
    return config

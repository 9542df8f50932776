"""Emu (v1, 14B): EVA-01-CLIP-g/14 + Causal Transformer (32 queries) + LLaMA-13B.

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu1_14b.py
Variants: `configs/emu1_14b.py:pretrain` (vocab 32004) and `configs/emu1_14b.py:instruct`
(adds [USER]/[ASSISTANT], vocab 32006).
"""
from emu_jax import config_lib


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, ("pretrain", "instruct"))
    config = config_lib.emu1_config(instruct=variant == "instruct")
    config.model.dtype = "bfloat16"
    config.lock()
    return config

"""Emu2-Chat: Emu2 with a 16x16 pooled connector (256 visual tokens per image) and
[USER]/[ASSISTANT] tokens (vocab 32274).

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu2_chat.py
"""
from emu_jax import config_lib


def get_config(arg=None):
    config_lib.parse_variant(arg, ("base",))
    config = config_lib.emu2_config(chat=True)
    config.model.dtype = "bfloat16"
    config.lock()
    return config

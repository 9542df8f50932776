"""Emu (v1, 14B): EVA-01-CLIP-g/14 + Causal Transformer (32 queries) + LLaMA-13B.

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu1_14b.py
Variants: `configs/emu1_14b.py:pretrain` (vocab 32004) and `configs/emu1_14b.py:instruct`
(Emu-I: adds [USER]/[ASSISTANT], vocab 32006; what the released Emu-instruct.pt converts into).

Instruction tuning on your own conversations (`python -m emu_jax.data.write conversations` into
`{data_dir}/chat-*.array_record`), rendered in Emu-I's format, text loss on the replies only:
    configs/emu1_14b.py:instruct_lora   Emu-I's recipe: peft-style adapters r 16, alpha 16, dropout
                                        0.05 on the LLM's q/k/v/o (Emu1/inference.py); only they train
    configs/emu1_14b.py:instruct_full   the Causal Transformer and the LLM train; EVA stays frozen
from a conversion of Emu-I (its adapters merged) or of the released Emu (the two chat tokens are
added to its vocabulary; then export merged, since the base checkpoint lacks their rows):
    python -m emu_jax.convert import --config=configs/emu1_14b.py:instruct --layout=emu1_instruct \\
        --source=/weights/Emu-instruct.pt --out=/ckpt/emu_i
    python -m emu_jax.train --config=configs/emu1_14b.py:instruct_lora --workdir=/runs/my_emu_i \\
        --config.data.data_dir=/data --config.train.init_from.vit=/ckpt/emu_i/checkpoints \\
        --config.train.init_from.connector=/ckpt/emu_i/checkpoints --config.train.init_from.llm=/ckpt/emu_i/checkpoints
    python -m emu_jax.convert export --config=configs/emu1_14b.py:instruct_lora --layout=emu1_instruct \\
        --checkpoint=/ckpt/emu_i/checkpoints --adapter=/runs/my_emu_i/checkpoints --out=/weights/my_emu_i.safetensors
The export holds the adapters unmerged in Emu-I's own peft wrapper (Emu1/inference.py --instruct
loads it); `--peft` instead writes them as a peft adapter directory.
"""
from emu_jax import config_lib

def get_config(arg=None):
    recipes = tuple(f"instruct_{recipe}" for recipe in config_lib.FINE_TUNING)
    variant = config_lib.parse_variant(arg, ("pretrain", "instruct") + recipes)
    config = config_lib.emu1_config(instruct=variant != "pretrain")
    config.model.dtype = "bfloat16"
    if variant in recipes:
        config_lib.fine_tune(config, variant.removeprefix("instruct_"), {"chat": ("{data_dir}/chat-*.array_record", 1.0)},
                             loss=(1.0, 0.0), chat_format="emu_i")
    config.lock()
    return config

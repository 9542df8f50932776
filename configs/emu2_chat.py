"""Emu2-Chat: Emu2 with a 16x16 pooled connector (256 visual tokens per image) and
[USER]/[ASSISTANT] tokens (vocab 32274).

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu2_chat.py

Instruction tuning on your own conversations (LLaVA / ShareGPT JSON written by
`python -m emu_jax.data.write conversations` into `{data_dir}/chat-*.array_record`), rendered in
Emu2-Chat's format, text loss on the replies only, from a conversion of the released Emu2-Chat
(or of Emu2: the two chat tokens are added to its vocabulary):
    configs/emu2_chat.py:lora   rank-16 adapters on the LLM's q/k/v/o; only they train
    configs/emu2_chat.py:full   the connector and the LLM train; the visual encoder stays frozen
e.g. python -m emu_jax.convert import --config=configs/emu2_chat.py --layout=emu2 \\
         --source=/weights/Emu2-Chat_pytorch_model.bf16.bin --out=/ckpt/emu2_chat
     python -m emu_jax.train --config=configs/emu2_chat.py:lora --workdir=/runs/my_chat \\
         --config.data.data_dir=/data --config.train.init_from.vit=/ckpt/emu2_chat/checkpoints \\
         --config.train.init_from.connector=/ckpt/emu2_chat/checkpoints \\
         --config.train.init_from.llm=/ckpt/emu2_chat/checkpoints
Which slices each fits, at which micro-batch: the README's fine-tuning memory table
(`python benchmarks/tpu_fit_table.py --table=finetune`).
"""
from emu_jax import config_lib

def get_config(arg=None):
    variant = config_lib.parse_variant(arg, ("base",) + tuple(config_lib.FINE_TUNING))
    config = config_lib.emu2_config(chat=True)
    config.model.dtype = "bfloat16"
    if variant != "base":
        config_lib.fine_tune(config, variant, {"chat": ("{data_dir}/chat-*.array_record", 1.0)}, loss=(1.0, 0.0))
    config.lock()
    return config

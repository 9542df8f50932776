"""Emu2-Gen: Emu2 (37B) with its visual decoder (an SDXL-shaped UNet conditioned on the regressed
image embeddings, and SDXL's VAE); what the released Emu2-Gen file converts into:
    python -m emu_jax.convert import --config=configs/emu2_gen.py --layout=emu2_gen \\
        --source=/weights/Emu2-Gen_pytorch_model.bf16.safetensors --out=/ckpt/emu2_gen

Generation tuning on your own data (Emu2-Gen's recipe: the regression loss on the image to
generate, nothing else; the visual encoder and the decoder frozen), from lines
{"prompt": text or [text, {"image": path}, {"box": [x1, y1, x2, y2]}, ...], "image": target}
written by `python -m emu_jax.data.write generation` into `{data_dir}/gen-*.array_record`
(text -> image, subject-driven, grounded with box images):
    configs/emu2_gen.py:lora   rank-16 adapters on the LLM's q/k/v/o; only they train
    configs/emu2_gen.py:full   the connector and the LLM train
e.g. python -m emu_jax.train --config=configs/emu2_gen.py:lora --workdir=/runs/my_gen \\
         --config.data.data_dir=/data --config.train.init_from.vit=/ckpt/emu2_gen/checkpoints \\
         --config.train.init_from.connector=/ckpt/emu2_gen/checkpoints \\
         --config.train.init_from.llm=/ckpt/emu2_gen/checkpoints
     python -m emu_jax.generate --config=configs/emu2_gen.py:lora --checkpoint=/ckpt/emu2_gen/checkpoints \\
         --decoder=/ckpt/emu2_gen/checkpoints --adapter=/runs/my_gen/checkpoints --prompt='a photo of a dax[IMG]'
(the run's own config with `--adapter`: it says which projections carry adapters)
"""
from emu_jax import config_lib

def get_config(arg=None):
    variant = config_lib.parse_variant(arg, ("base",) + tuple(config_lib.FINE_TUNING))
    config = config_lib.emu2_config()
    config.model.dtype = "bfloat16"
    config.model.update(config_lib.emu2_gen_decoder())
    if variant != "base":
        config_lib.fine_tune(config, variant, {"gen": ("{data_dir}/gen-*.array_record", 1.0)}, loss=(0.0, 1.0))
    config.lock()
    return config

"""Emu2 (37B): EVA-02-CLIP-E/14+ (448 px, post-norm) + 8x8 pooled connector + LLaMA-33B.

Parameter count (no weights allocated):
    python -m emu_jax.summary --config=configs/emu2_37b.py

Training recipes of the Emu2 paper, as variants (data paths are the user's ArrayRecord shards
written by `python -m emu_jax.data.write`; the tokenizer is LLaMA's `tokenizer.model`):
    configs/emu2_37b.py:stage1   image/video-text pairs, captioning loss only, 224 px
                                 (then rerun with --config.model.vit.image_size=448)
    configs/emu2_37b.py:stage2   interleaved image-text, video, text-only; text + regression loss,
                                 visual encoder frozen
Then instruction tuning (Emu2-Chat): configs/emu2_chat.py:full or :lora, from this model's weights;
generation tuning (Emu2-Gen): configs/emu2_gen.py:full or :lora.
e.g. python -m emu_jax.train --config=configs/emu2_37b.py:stage2 --workdir=gs://bucket/emu2/stage2 \\
         --config.train.init_from.vit=CONVERTED --config.train.init_from.llm=CONVERTED
"""
import ml_collections

from emu_jax import config_lib

SOURCES = {  # variant: {name: (glob of shards, weight)}
    "stage1": {"pairs": ("{data_dir}/laion-*.array_record", 0.8), "video": ("{data_dir}/webvid-*.array_record", 0.2)},
    "stage2": {"pairs": ("{data_dir}/laion-*.array_record", 0.3), "mmc4": ("{data_dir}/mmc4-*.array_record", 0.4),
               "video": ("{data_dir}/webvid-*.array_record", 0.1),
               "storyboard": ("{data_dir}/storyboard-*.array_record", 0.1),
               "text": ("{data_dir}/text-*.array_record", 0.1)},
}
LOSS_WEIGHTS = {"stage1": (1.0, 0.0), "stage2": (1.0, 1.0)}


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, ("base", "stage1", "stage2"))
    config = config_lib.emu2_config()
    config.model.dtype = "bfloat16"
    config.model.vit.remat = config.model.llm.remat = "dots_no_batch"
    if variant != "base":
        config.data.tokenizer = "{data_dir}/llama/tokenizer.model"
        config.data.train_sources = ml_collections.ConfigDict(
            {name: config_lib.source("array_record", path, weight=weight)
             for name, (path, weight) in SOURCES[variant].items()})
        config.loss.text_weight, config.loss.regression_weight = LOSS_WEIGHTS[variant]
        config.mesh.fsdp, config.mesh.data = -1, 1
    if variant == "stage1":
        config.model.vit.image_size, config.model.vit.pos_embed_grid = 224, 32  # keeps the 448 px table
    if variant == "stage2":
        config.optimizer.freeze = r"^vit/"
    config.lock()
    return config

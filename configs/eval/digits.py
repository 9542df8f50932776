"""The digits sweep on the tiny checkpoints: held-out captions, "what digit is this?" VQA, in-context
arbitrary labelling at k demonstrations, captions of moving-digit videos (digit and direction), and
text-to-image digits judged by an independent classifier.

    python -m emu_jax.train --config=configs/tiny.py --workdir=/tmp/emu_tiny
    python -m emu_jax.train --config=configs/tiny_decoder.py:vae --workdir=/tmp/emu_vae
    python -m emu_jax.train --config=configs/tiny_decoder.py:decoder --workdir=/tmp/emu_decoder \\
        --config.train.init_from.vae=/tmp/emu_vae/checkpoints --config.train.init_from.vit=/tmp/emu_tiny/checkpoints \
        --config.train.init_from.connector=/tmp/emu_tiny/checkpoints
    python -m emu_jax.evaluate --config=configs/eval/digits.py

Paths are overridable (`--config.checkpoints.tiny.checkpoint=DIR`, `--config.out=DIR`). A re-run skips
finished cells; a killed sweep resumes. Measured on seed 0's checkpoints by `python
benchmarks/readme_figures.py --stages=sweep`: the README's sweep table.
"""
import ml_collections

from emu_jax import config_lib


def get_config():
    config = ml_collections.ConfigDict()
    config.out = "/tmp/emu_eval_digits"
    config.checkpoints = {"tiny": {"config": "configs/tiny_decoder.py:decoder",
                                   "checkpoint": "/tmp/emu_tiny/checkpoints",
                                   "decoder": "/tmp/emu_decoder/checkpoints"}}
    # The tiny model learned in-context prompts only in the "this is a <word>." form of the few-shot
    # documents, so captions, VQA and video run zero-shot and the labelling task carries the k sweep.
    # Videos show as many frames as the model was trained on (configs/tiny.py: data.video_frames).
    config.tasks = {"caption": {"kind": "digits_caption", "limit": 200, "shots": (0,)},
                    "vqa": {"kind": "digits_vqa", "limit": 200, "shots": (0,)},
                    "labelling": {"kind": "digits_labelling", "limit": 200},
                    "video": {"kind": "digits_video", "limit": 200, "shots": (0,), "frames": 4},
                    "t2i": {"kind": "digits_t2i", "limit": 64}}
    config.shots = (0, 1, 2, 4, 8)
    # seeded random picks, and RICES (nearest train images by visual-encoder features): both in the grid
    config.demonstrations = ("random", "rices")
    # 12 new tokens, as the training run's final caption evaluator (configs/tiny.py): an image alone may be
    # continued in the VQA documents' format, which names the digit at the 10th token
    config.decodings = {"greedy": {"strategy": "greedy", "max_new_tokens": 12, "batch_size": 32}}
    config.seed = 0
    config.distributed = config_lib.distributed_config()  # a sweep over several processes, as training
    return config

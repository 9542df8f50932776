"""Generation tuning on a user's own images: the quickstart model (configs/tiny.py) taught Emu2-Gen's
grounded and subject-driven generation on digits-world canvases (emu_jax/data/digits_gen.py), drawn
by the tiny visual decoder (configs/tiny_decoder.py) retrained on canvases.

    python -m emu_jax.data.digits_gen --out=/tmp/digits_gen
    for split in train test; do
      python -m emu_jax.data.write generation --input=/tmp/digits_gen/$split.jsonl --output=/tmp/digits_gen/gen_$split
      python -m emu_jax.data.write pairs --input=/tmp/digits_gen/$split-canvases.jsonl \\
          --output=/tmp/digits_gen/canvases_$split
    done
    python -m emu_jax.train --config=configs/tiny_gen.py:vae --workdir=/tmp/emu_canvas_vae
    python -m emu_jax.train --config=configs/tiny_gen.py:decoder --workdir=/tmp/emu_canvas_decoder
    python -m emu_jax.train --config=configs/tiny_gen.py:full --workdir=/tmp/emu_gen     # or :lora

`vae` and `decoder` continue the tiny decoder's VAE and UNet (`/tmp/emu_vae`, `/tmp/emu_decoder`) on
the canvases. The decoder stage trains the visual encoder (from the quickstart's) with the UNet: on
the frozen quickstart encoder, trained to caption centred digits, the UNet drew the digit in its
quadrant 40% of the time after 4,500 steps (the encoder's four pooled tokens do tell the quadrant: a
linear probe on them reads it perfectly, but the UNet's cross-attention did not learn to); trained
with it, 98.6% at step 3,000 and 100% from 4,500 on. 9,000 steps: in that trial the digit's crop was
classified right 89.2% of the time at 4,500 and 94.7% after continuing to 9,000 (the table's runs:
0.91-0.94). `lora` then tunes the quickstart LLM with adapters (rank 16 on attention,
MLP and the connector's projections) on the regression loss of the target image alone (Emu2-Gen's
recipe), its visual encoder the canvas decoder's (frozen); `full` trains the LLM and connector. Images
are sampled with guidance against zero embeddings, what the decoder learned as unconditional through
its condition dropout: against the empty prompt's regression (Emu2-Gen's choice) the crops scored
0.724 at guidance 4 and 0.884 at 1 (`full`, seed 0).

Every stage ends by printing the independent check of `eval/tasks.DigitsGeneration` on the 360
held-out digits' canvases (the decoder stages: on their reconstructions; the tuning stages: on the
720 held-out prompts, per kind too): `crop_accuracy`, the share whose crop at the target box the
digit classifier labels as the digit, and `in_box`, the share whose ink centre lies in the box
(chance: 25%). `--config.train.steps=0` prints the untuned values. `python
benchmarks/readme_figures.py --stages=gen` measures every stage from each seed's quickstart and tiny
decoder checkpoints (the README's generation table), on constraints.txt, `:full`: crop accuracy
untuned -> tuned 0.092 -> 0.885, 0.093 -> 0.889, 0.082 -> 0.883 for seeds 0, 1, 2, ink in the box
0.15-0.25 -> 1.000 for each (the subject-driven half alone: 0.892, 0.867, 0.872; the canvas decoder's
own reconstructions, the ceiling: 0.939, 0.906, 0.939); 17-24 minutes of decoder stages and 5-7 of
tuning on 2 cores (Intel Xeon, amx). `:lora` at 1,500 steps: 0.874 / 0.999 in a trial on seed 0 (`:full` 0.917 there).
"""
from emu_jax import config_lib
from emu_jax.models import lora

TINY = "/tmp/emu_tiny/checkpoints"
CANVAS_DECODER = "/tmp/emu_canvas_decoder/checkpoints"
LLM_TARGETS = r"^llm/.*/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))$"


def _sources(config, name: str) -> None:
    """Train on `name`'s train shards; the held-out loss on its test shards."""
    for split in ("train", "test"):
        config.data[f"{'train' if split == 'train' else 'eval'}_sources"] = {
            name: config_lib.source("array_record", f"/tmp/digits_gen/{name}_{split}-*.array_record")}


def decoder_stage(config, stage: str) -> None:
    """The tiny decoder's stage continued on the canvases."""
    _sources(config, "canvases")
    config.data.image_documents_where = {}
    start = {"vae": dict(vae="/tmp/emu_vae/checkpoints"),
             "decoder": dict(vae="/tmp/emu_canvas_vae/checkpoints", unet="/tmp/emu_decoder/checkpoints",
                             vit=TINY, connector=TINY)}[stage]
    longer = dict(steps=9000, eval_every=3000, checkpoint_every=3000) if stage == "decoder" else {}
    config.train = config_lib.train_config(**(config.train.to_dict() | longer | dict(init_from=start)))
    if stage == "decoder":  # the encoder trains with the UNet (see the docstring)
        config.optimizer.freeze = r"^(connector|vae)/"
    config.evals = {"canvases": config_lib.evaluator("canvas_reconstructions", every=config.train.eval_every,
                                                     count=360)}


def gen_stage(config, recipe: str) -> None:
    config.task = "emu"
    _sources(config, "gen")
    config.data.augment.kind = "none"  # the box and the digit's place are what is learned
    config.data.image_documents_where = {}
    config.loss.text_weight, config.loss.regression_weight = 0.0, 1.0
    config.stages = {}
    if recipe == "lora":
        config.model.lora.update(rank=16, alpha=32.0, dropout=0.0,
                                 targets=LLM_TARGETS + r"|^connector/project_(up|down)$")
        optimizer = dict(learning_rate=3e-3, train_only=lora.ADAPTERS)
    else:
        optimizer = dict(learning_rate=1e-3, freeze=r"^vit/")
    config.optimizer = config_lib.optimizer_config(warmup_steps=50, weight_decay=0.0, **optimizer)
    config.train = config_lib.train_config(steps=1500, log_every=50, eval_every=500, checkpoint_every=500,
                                           init_from=dict(vit=CANVAS_DECODER, connector=TINY, llm=TINY))
    config.generate.uncond = "zeros"  # what the decoder learned as unconditional (its condition dropout)
    config.evals = {"generation": config_lib.evaluator(
        "task", task={"kind": "digits_generation", "limit": 360}, decoder=CANVAS_DECODER)}


def get_config(arg=None):
    stage = config_lib.parse_variant(arg, ("lora", "full", "vae", "decoder"))
    config = config_lib.load(__file__.replace("tiny_gen.py", "tiny_decoder.py") + ":"
                             + (stage if stage in ("vae", "decoder") else "decoder"))
    with config.unlocked():
        if stage in ("vae", "decoder"):
            decoder_stage(config, stage)
        else:
            gen_stage(config, stage)
    config.lock()
    return config

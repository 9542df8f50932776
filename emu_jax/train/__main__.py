"""`python -m emu_jax.train --config=configs/tiny.py --workdir=DIR [--config.train.steps=300]`

Trains (or resumes) what the config describes (`config.task`: the Emu model, or a stage of the
visual decoder), then runs its final evaluators (`config.evals`) and prints their metrics, e.g. on
the embedded digits world `eval/captions/accuracy: <percent>` (the Emu run) or
`eval/digits/recognisability: <percent>` (a decoder stage).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from emu_jax import xla_flags
from emu_jax.train.trainer import RUN_ERRORS, train, use_compilation_cache

config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/tiny.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    xla_flags.apply_defaults(flags.FLAGS.config.get("task", "emu"))  # JAX's backend starts later, in train()
    if flags.FLAGS.config.train.get("compilation_cache", True):
        use_compilation_cache(flags.FLAGS.workdir)
    try:
        result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except RUN_ERRORS as e:  # what a user did or the run met, said in one line (no traceback)
        print(f"error: {e}", file=sys.stderr, flush=True)
        # Exit now: after a failed checkpoint write, Orbax's writer threads may never finish, and the
        # interpreter would wait for them at exit (a run that reported a full disk, then hung).
        os._exit(1)
    if result["skipped_updates"]:
        print(f"skipped {result['skipped_updates']} non-finite update(s) (see data/ and skipped_updates in "
              f"metrics.jsonl)")
    for key, value in result.items():
        if "/" not in key:  # step and skipped_updates; evaluators' metrics are "<name>/<metric>"
            continue
        print(f"eval/{key}: {value:.4f}")
        if key.endswith("/latent_std"):
            print(f"  (a decoder's model.vae.scaling_factor near {1 / value:.3f} gives the diffusion model "
                  f"unit-variance latents)")


if __name__ == "__main__":
    app.run(main)

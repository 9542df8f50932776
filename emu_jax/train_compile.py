"""Compile the train step of a config for a TPU slice ahead of time, on any machine:

    python -m emu_jax.train_compile --config=configs/emu2_37b.py --topology=v5p-128
    python -m emu_jax.train_compile --config=configs/emu2_37b.py --topology=v5p-128 --fit
    python -m emu_jax.train_compile --config=configs/tiny.py --topology=cpu   # this machine's devices

Prints per-device memory against the chip's HBM, compiler and analytic FLOPs, the compiler's
estimated step time, tokens/s and an MFU estimate. When the step does not fit it says so and lists
what would lower memory (more FSDP, full remat, a smaller per-device micro-batch) as --config
overrides; `--fit` applies them one at a time until it fits. Needs libtpu for TPU targets
(`pip install "jax[tpu]"`); JAX_PLATFORMS defaults to cpu here, since no TPU is needed.
"""
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only described, never opened

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
flags.DEFINE_string("topology", "v5p-128", "TPU slice (v5p-128, v5e-256, v6e-256, v4-64, v5p:4x4x4) or 'cpu'.")
flags.DEFINE_bool("fit", False, "Apply the suggested changes one at a time until the step fits.")
flags.DEFINE_bool("estimate", True, "Also compile 1- and 2-layer variants to extrapolate FLOPs and step time.")
flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def overrides_as_flags(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def main(argv):
    del argv
    from emu_jax import config_lib
    from emu_jax.train import aot
    config = FLAGS.config
    if FLAGS.fit:
        report, applied = aot.fit(config, FLAGS.topology, extrapolate=FLAGS.estimate)
    else:
        report, applied = aot.compile_report(config, FLAGS.topology, extrapolate=FLAGS.estimate), {}
    print(aot.format_report(report))
    if applied:
        print(f"{'fits' if report.fits else 'still does not fit'} with: {overrides_as_flags(applied)}")
    if report.fits is False:
        final = config_lib.with_overrides(config, applied)
        options = aot.suggestions(final, report)
        if options:
            print("to lower memory, try (most effective first):")
            for reason, overrides in options:
                print(f"  {reason}: {overrides_as_flags(overrides)}")
        else:
            print("no further change is suggested: a larger slice is needed")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dict(vars(report), total_bytes=report.total_bytes, tokens_per_second=report.tokens_per_second,
                           mfu=report.mfu, overrides=applied), f, indent=1)


if __name__ == "__main__":
    app.run(main)

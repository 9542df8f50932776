"""Compile the train step of a config for a TPU slice ahead of time, on any machine:

    python -m emu_jax.train_compile --config=configs/emu2_37b.py --topology=v5p-128
    python -m emu_jax.train_compile --config=configs/emu2_37b.py --topology=v5p-128 --fit
    python -m emu_jax.train_compile --config=configs/emu2_37b.py --topology=v5p-128 --search
    python -m emu_jax.train_compile --config=configs/tiny.py --topology=cpu   # this machine's devices

Prints per-device memory against the chip's HBM, compiler and analytic FLOPs, the compiler's
estimated step time, tokens/s and an MFU estimate. When the step does not fit it says so and lists
what would lower memory (more FSDP, full remat, a smaller per-device micro-batch) as --config
overrides; `--fit` applies them one at a time until it fits (the first plan that fits);
`--search` finds the fastest plan that fits (`emu_jax.train.plan_search`: remat policy per tower,
mesh split, micro-batches, scanned or not; ranked by estimated MFU and compiled whole in that order
until one fits; compiles cached under --cache_dir, run in --jobs processes). Needs libtpu for TPU targets
(`pip install "jax[tpu]"`); JAX_PLATFORMS defaults to cpu here, since no TPU is needed.
"""
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only described, never opened

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from emu_jax.train.plan_search import DEFAULT_POLICIES  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config.", lock_config=True)
flags.DEFINE_string("topology", "v5p-128", "TPU slice (v5p-128, v5e-256, v6e-256, v4-64, v5p:4x4x4) or 'cpu'.")
flags.DEFINE_bool("fit", False, "Apply the suggested changes one at a time until the step fits.")
flags.DEFINE_bool("estimate", True, "Also compile 1- and 2-layer variants to extrapolate FLOPs and step time.")
flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
flags.DEFINE_bool("search", False, "Search for the plan with the highest estimated MFU that fits.")
flags.DEFINE_list("policies", ",".join(DEFAULT_POLICIES), "--search: remat policies tried per tower.")
flags.DEFINE_list("tensor", "1,2,4", "--search: tensor-parallel sizes (FSDP takes the rest of the chips).")
flags.DEFINE_list("data", "1", "--search: data-parallel sizes.")
flags.DEFINE_list("accum", "1,2,4", "--search: micro-batches per step (gradient accumulation).")
flags.DEFINE_list("scan", "true", "--search: scanned layers (true), unrolled (false), or both.")
flags.DEFINE_float("margin", 0.1, "--search: share of HBM left free by a plan that fits.")
flags.DEFINE_integer("verify", 1, "--search: compile plans in estimated-MFU order until this many fit.")
flags.DEFINE_integer("max_compiles", 40, "--search: at most this many plans compiled whole (the probes aside).")
flags.DEFINE_integer("jobs", 1, "--search: compiles run in parallel processes.")
flags.DEFINE_integer("show", 12, "--search: plans printed (all go to --json).")
flags.DEFINE_string("cache_dir", "~/.cache/emu_jax/train_compile", "--search: compiled results kept here.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def overrides_as_flags(overrides: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def run_search(config) -> None:
    from emu_jax.train import plan_search
    space = plan_search.Space(policies=tuple(FLAGS.policies), tensor=tuple(map(int, FLAGS.tensor)),
                              data=tuple(map(int, FLAGS.data)), accum=tuple(map(int, FLAGS.accum)),
                              scan=tuple(s.lower() == "true" for s in FLAGS.scan))
    result = plan_search.search(config, FLAGS.topology, space, margin=FLAGS.margin, verify=FLAGS.verify,
                                jobs=FLAGS.jobs, max_compiles=FLAGS.max_compiles,
                                cache_dir=os.path.expanduser(FLAGS.cache_dir))
    candidates = result.candidates
    print(plan_search.format_table(candidates, limit=FLAGS.show))
    print(f"{len(candidates)} plans, {result.probes} probe compiles, "
          f"{sum(1 for c in candidates if c.compiled)} full compiles, {result.seconds / 60:.1f} min")
    best = candidates[0] if candidates and candidates[0].verdict == "fits" else None
    if best:
        print(f"fastest plan that fits ({best.mfu:.1%} estimated MFU): {overrides_as_flags(best.plan.overrides())}")
    else:
        print("no plan of the search space fits: a larger slice, or a wider space (--tensor, --accum, --policies)")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"target": FLAGS.topology, "space": dataclasses.asdict(space), "probes": result.probes,
                       "seconds": result.seconds,
                       "candidates": [c.as_dict() for c in candidates]}, f, indent=1, default=str)


def main(argv):
    del argv
    from emu_jax import config_lib
    from emu_jax.train import aot
    config = FLAGS.config
    if FLAGS.search:
        return run_search(config)
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

"""Text -> image end to end: ours against the official Emu2-Gen pipeline, on the same weights, in one run.

    python benchmarks/t2i_vs_official.py [--steps=50 --repeats=3 --prompt="an astronaut riding a horse"]

Both sides are built as tests/test_release_pipeline.py builds them: the release's `EmuVisualGeneration`
(Emu2/emu/diffusion.py) around the official tiny `EmuModel` (128 px EVA, 64 visual embeddings, a
2-layer LLaMA of width 64, the release's tokenizer) and diffusers' UNet / VAE / Euler scheduler from
the release's diffusion_config (sizes shrunk, 32 px images), every parameter random; ours is our
`Generator` on its state_dict converted with the `emu2_gen` layout. One call on each side is the
whole pipeline: 64 embeddings regressed for the prompt and 64 for the empty prompt (the negative),
`--steps` Euler steps with guidance 3.0, the VAE decode, uint8 pixels. Same prompt, same initial
latents (torch's draw, given to ours). Timings are interleaved (official, ours, official, ...) and
the best of `--repeats` is reported (our first call, which compiles, is reported apart); on the
CPU, one JAX device, XLA's YNNPACK fusions off as for the tests and decoder training
(emu_jax/xla_flags.py). Prints the outputs' max difference and the speed ratio (target >= 5x).
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # tests/conftest.py would fake 8


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (the release's default: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (the best is reported)")
    parser.add_argument("--prompt", default="an astronaut riding a horse on mars")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initial latents")
    args = parser.parse_args()

    from test_release_pipeline import build_emu2_gen, run_official
    from emu_jax.generate import prompts
    official, ours = build_emu2_gen(args.steps)
    size = ours.config.model.decoder.image_size
    segments = prompts.parse(args.prompt + "[IMG]", size)

    def run_ours(noise):
        return ours.generate([segments], noise=noise)[0].images[0]

    def run_theirs():
        return run_official(official, [args.prompt], size, args.seed, args.steps, original_size=[size, size])

    noise = run_theirs()[2]
    start = time.perf_counter()
    run_ours(noise)
    compile_seconds = time.perf_counter() - start
    official_times, our_times, max_diff = [], [], 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        pixels, _, noise = run_theirs()
        official_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        image = run_ours(noise)
        our_times.append(time.perf_counter() - start)
        max_diff = max(max_diff, float(np.abs(image.astype(np.float64) - np.round(pixels * 255)).max()))
    best_official, best_ours = min(official_times), min(our_times)
    print(f"prompt {args.prompt!r}, {size} px, {args.steps} Euler steps, guidance 3.0, best of {args.repeats}")
    print(f"official EmuVisualGeneration: {best_official:.3f} s per image")
    print(f"ours (jitted): {best_ours:.3f} s per image (first call, compiling: {compile_seconds:.1f} s)")
    print(f"max |ours - official| over the uint8 pixels: {max_diff:.0f}")
    print(f"ours / official: {best_official / best_ours:.1f}x faster")


if __name__ == "__main__":
    main()

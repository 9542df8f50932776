import os

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation of
# the kernels XLA emits for the CPU is the larger part of compiling them, and at level 0 the suite
# took 771 s instead of 897 s on 2 cores (the same tests passing). Tests only, in this process and in the
# CLI processes tests launch; the library, its CLIs and the benchmarks run XLA's defaults, and so
# does the quickstart guard in test_train (150 steps: running time, not compiling, dominates).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags_for(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


# Eight fake CPU devices for the mesh tests; set before JAX initialises its backend. CPU only:
# libtpu (installed for the ahead-of-time TPU compiles) would otherwise look for a TPU.
os.environ.setdefault("XLA_FLAGS", xla_flags_for(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_one_compilation_cache():
    """One XLA compilation cache for the whole run: set here in the first process (pytest, or
    xdist's controller), it is inherited by both xdist workers and by every process a test
    launches (CLI runs, two-process runs, a killed run and its relaunch), which compile the same
    tiny programs over and over. A fresh directory per run, removed at its end; a user's own
    JAX_COMPILATION_CACHE_DIR is kept."""
    import atexit
    import shutil
    import tempfile
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="emu_jax_tests_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


_share_one_compilation_cache()

from emu_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults("decoder")  # as the train CLI does for decoder runs (faster CPU convolutions)

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def init_key(seed: int = 0):
    """A key for drawing test parameters: XLA compiles threefry separately per parameter shape, which
    made initialisers the slowest compiles of the suite; RngBitGenerator keys compile in a fraction
    (the trainer's config.init_prng does the same)."""
    import jax
    return jax.random.key(seed, impl="unsafe_rbg")


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py[:arg], loaded as `--config=` would."""
    from emu_jax import config_lib
    return config_lib.load(str(ROOT / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))


# A smaller decoder than configs/tiny_decoder.py for tests that only check plumbing, not quality:
# the UNet/VAE steps compile in a fraction of the time. As `--config.` overrides for CLI tests.
SMALL_DECODER = {"model.unet.block_out_channels": (8, 16), "model.unet.num_heads": (2, 2),
                 "model.vae.block_out_channels": (8, 8, 8), "model.decoder.sampler_steps": 2}


def small_decoder_config(stage: str = "decoder"):
    from emu_jax import config_lib
    return config_lib.with_overrides(load_config("tiny_decoder", stage), SMALL_DECODER)


def as_flags(overrides: dict) -> list[str]:
    """`--config.a.b=value` arguments for a dict of overrides (tuples comma-joined)."""
    return [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in overrides.items()]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A sentencepiece model trained in a second on a few digits-world sentences (the real one
    needs the whole digits world built first)."""
    from emu_jax.data.digits import train_sentencepiece
    from emu_jax.data.tokenizer import Tokenizer
    sentences = ["a handwritten three", "this is a dax.", "question: what digit is this? answer: four",
                 "this is a wug.", "a handwritten seven moving left"] * 20
    path = train_sentencepiece(sentences, str(tmp_path_factory.mktemp("sp") / "sp.model"), 64)
    return Tokenizer(path, load_config("tiny").model.tokens)


@pytest.fixture(scope="session")
def digits_world(tmp_path_factory):
    """A data_dir holding the embedded digits world (built once per test process: ~15 s)."""
    from emu_jax.data import digits
    path = str(tmp_path_factory.mktemp("datasets"))
    digits.build(path)
    return path


@pytest.fixture(scope="session")
def data_dir(digits_world):
    """The data_dir of the training and decoder tests: the digits world."""
    return digits_world


def pytest_collection_modifyitems(items):
    """Slow-marked tests first, in their files' order: on two xdist workers, test_train's
    minutes-long runs came last in file order and ran alone at the end of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

import os

# Eight fake CPU devices for the mesh tests; set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from emu_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults("decoder")  # as the train CLI does for decoder runs (faster CPU convolutions)

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py[:arg], loaded as `--config=` would."""
    from emu_jax import config_lib
    return config_lib.load(str(ROOT / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))

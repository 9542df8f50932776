"""TPU slices named as Cloud TPU names them (`v5p-128`, `v5e-256`, `v6e-256`, `v4-64`) or as a
generation and chip grid (`v5p:4x4x4`), turned into abstract devices for ahead-of-time compiles.

`jax.experimental.topologies` builds the devices of a slice from libtpu (`pip install "jax[tpu]"`)
on any machine, without TPUs: compiling against them gives the real TPU compiler's memory layout
and cost model. v4 and v5p names count TensorCores (two per chip, one JAX device per chip in
megacore mode); v5e and v6e names count chips.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, dense
    cores_per_chip: int  # how many TensorCores a slice name counts per chip
    libtpu_name: str  # the generation as libtpu's topology names spell it
    chip_config: str  # "megacore" (two cores as one device) or "default"
    grid_rank: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    gke_accelerator: str  # GKE's node label cloud.google.com/gke-tpu-accelerator


# Public Cloud TPU specifications (HBM per chip, bf16 peak per chip).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, "v4", "megacore", 3, "tpu-v4-podslice"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, "v5", "megacore", 3, "tpu-v5p-slice"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, "v5e", "default", 2, "tpu-v5-lite-podslice"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, "v6e", "default", 2, "tpu-v6e-slice"),
}
# The chip grid of a slice of n chips: Cloud TPU's standard shapes.
GRIDS = {
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)},
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
}
CHIPS_PER_HOST = (2, 2, 1)  # every generation here: 4 chips per host


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.num_slices

    @property
    def hosts(self) -> int:
        """TPU VM hosts per slice (4 chips each)."""
        return max(math.prod(self.grid) // math.prod(CHIPS_PER_HOST), 1)

    @property
    def grid_name(self) -> str:
        return "x".join(map(str, self.grid))

    @property
    def libtpu_topology(self) -> str:
        return f"{self.chip.libtpu_name}:{self.grid_name}"


def parse(name: str, num_slices: int = 1) -> Slice:
    """`v5p-128` (Cloud name) or `v5p:4x4x4` (generation:chip grid) -> Slice; a clear error otherwise."""
    known = ", ".join(sorted(CHIPS))
    match = re.fullmatch(r"(v\d+[a-z]?)([-:])(.+)", name.strip())
    if not match or match.group(1) not in CHIPS:
        raise ValueError(f"unknown TPU slice {name!r}: expected <generation>-<cores> (e.g. v5p-128) or "
                         f"<generation>:<grid> (e.g. v5p:4x4x4) with generation one of {known}")
    chip, sep, rest = CHIPS[match.group(1)], match.group(2), match.group(3)
    if sep == ":":
        grid = tuple(int(x) for x in rest.split("x"))
        if len(grid) != chip.grid_rank:
            raise ValueError(f"TPU slice {name!r}: {chip.generation} grids have {chip.grid_rank} dimensions")
    else:
        cores = int(rest)
        chips, remainder = divmod(cores, chip.cores_per_chip)
        grids = GRIDS[chip.grid_rank]
        if remainder or chips not in grids:
            sizes = ", ".join(f"{chip.generation}-{n * chip.cores_per_chip}" for n in sorted(grids))
            raise ValueError(f"TPU slice {name!r} is not a standard shape; known: {sizes} "
                             f"(or give the grid, e.g. {chip.generation}:{'x'.join(['4'] * chip.grid_rank)})")
        grid = grids[chips]
    return Slice(name, chip, grid, num_slices)


def host_bounds(grid: tuple[int, ...]) -> tuple[int, ...]:
    """The chip grid of one host: 2x2x1, or the whole slice's grid where it is smaller (one chip)."""
    return tuple(min(host, chips) for host, chips in zip(CHIPS_PER_HOST, tuple(grid) + (1,) * (3 - len(grid))))


def devices(tpu_slice: Slice) -> list:
    """Abstract devices of the slice (needs libtpu; no TPU)."""
    # libtpu takes a machine-wide lock file when it loads; describing a topology opens no chip, so
    # several processes (parallel tests, a training run beside a compile) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=tpu_slice.libtpu_topology, chip_config_name=tpu_slice.chip.chip_config,
            chips_per_host_bounds=host_bounds(tpu_slice.grid),
            num_slices=tpu_slice.num_slices)
    except Exception as e:  # libtpu missing or refusing the topology: say which and how to get it
        raise RuntimeError(f"cannot describe TPU slice {tpu_slice.name} ({tpu_slice.libtpu_topology}): {e}. "
                           f"Ahead-of-time TPU compiles need libtpu: pip install 'jax[tpu]'") from e
    return list(description.devices)

"""Low-rank adapters (LoRA) on chosen projections, as `config.model.lora` describes them.

    config.model.lora = {"rank": 16, "alpha": 16.0, "dropout": 0.05,
                         "targets": r"^llm/.*/self_attn/(q_proj|k_proj|v_proj|o_proj)$"}   # Emu-I's

`targets` is a regular expression over a projection's module path (`llm/layers_3/self_attn/q_proj`;
scanned stacks: `llm/layers/self_attn/q_proj`). A targeted projection y = x . W gains
y += alpha / rank * dropout(x) . A . B, with A [*in, rank] (peft's initialisation: uniform within
1/sqrt(fan-in)) and B [rank, *out] (zeros, so an adapted model starts as its base), held beside the
kernel as `lora_a` / `lora_b` (float32) and sharded on the kernel's input / output logical axes. Dropout acts
only where the caller passes a "dropout" rng (training). Rank 0: no adapters.

The trainer trains the adapters alone (`config.optimizer.train_only`); `merge` folds them into the
kernels (export, or faster generation).
"""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_NAMES = ("lora_a", "lora_b")
ADAPTERS = r"/lora_[ab]$"  # the adapters' parameter paths, for config.optimizer.train_only


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, path) -> bool:
        return re.search(self.targets, "/".join(path)) is not None


class LoraConfigError(ValueError):
    """A LoRA run's adapters given with a config that describes no adapters."""


def required_spec(lora_config, adapter_dir: str) -> LoraSpec:
    """The spec a LoRA run's adapters at `adapter_dir` were trained with, or one line saying the
    config lacks it (adapters read with a rank-0 config would be silently left out)."""
    found = spec(lora_config)
    if found is None:
        raise LoraConfigError(f"--adapter {adapter_dir}: the config has no model.lora (rank 0); give the config the "
                              f"LoRA run trained with")
    return found


def spec(lora_config) -> LoraSpec | None:
    """The model config's `lora` entry as a LoraSpec (None: no adapters)."""
    if lora_config is None or not lora_config.get("rank"):
        return None
    if not lora_config.get("targets"):
        raise ValueError("model.lora.rank > 0 needs model.lora.targets (a regex over projection paths)")
    return LoraSpec(int(lora_config.rank), float(lora_config.alpha), float(lora_config.dropout),
                    str(lora_config.targets))


def adapt(module: nn.Module, x: jax.Array, y: jax.Array, kernel_axes: tuple, contract: int) -> jax.Array:
    """`y` (= x . kernel of the Dense `module`) plus the module's low-rank update, creating the
    adapters at initialisation."""
    lora: LoraSpec = module.lora
    in_shape, out_shape = x.shape[x.ndim - contract:], y.shape[y.ndim - (len(kernel_axes) - contract):]
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(contract)),
                                              out_axis=-1)
    # adapters are what trains: float32 whatever the frozen base is stored in (a LoRA recipe keeps it in bf16)
    a = module.param("lora_a", nn.with_logical_partitioning(a_init, kernel_axes[:contract] + (None,)),
                     in_shape + (lora.rank,), jnp.float32)
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + kernel_axes[contract:]),
                     (lora.rank,) + out_shape, jnp.float32)
    if lora.dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0)
    x = x.astype(module.dtype)
    low = jax.lax.dot_general(x, a.astype(module.dtype), ((tuple(range(x.ndim - contract, x.ndim)),
                                                          tuple(range(contract))), ((), ())))
    update = jax.lax.dot_general(low, b.astype(module.dtype), (((low.ndim - 1,), (0,)), ((), ())))
    return y + (lora.scale * update).astype(y.dtype)


def _is_adapted(node) -> bool:
    return isinstance(node, dict) and "lora_a" in node and "kernel" in node


def merge(params, lora: LoraSpec):
    """Parameters with every adapter folded into its kernel (W + alpha / rank * A . B) and removed:
    the base model's tree, computing what the adapted model computes (without dropout)."""
    if _is_adapted(params):
        a, b, kernel = params["lora_a"], params["lora_b"], params["kernel"]
        product = lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)  # noqa: E731
        if a.ndim + b.ndim - 2 > kernel.ndim:  # a scanned stack: a leading layer axis on all three
            product = jax.vmap(product)
        update = product(a, b) * lora.scale
        rest = {k: v for k, v in params.items() if k not in ADAPTER_NAMES}
        return rest | {"kernel": (kernel.astype(jnp.float32) + update).astype(kernel.dtype)}
    if isinstance(params, dict):
        return {k: merge(v, lora) for k, v in params.items()}
    return params


def split(params) -> tuple[dict, dict]:
    """(the base parameters, the adapters alone), both nested like `params`."""
    def take(tree: dict, adapters: bool) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                sub = take(value, adapters)
                if sub or not adapters:
                    out[key] = sub
            elif (key in ADAPTER_NAMES) == adapters:
                out[key] = value
        return out
    return take(params, False), take(params, True)


def join(base: dict, adapters: dict) -> dict:
    """`split`'s inverse: the adapters put back beside their kernels."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join(base[key], value) if isinstance(value, dict) else value
    return out


def count(params) -> tuple[int, int]:
    """(adapter parameters, all parameters)."""
    base, adapters = split(params)
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    return size(adapters), size(base) + size(adapters)

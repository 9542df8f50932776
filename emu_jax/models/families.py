"""Model families by name: `config.model.family` (default "emu") picks the module that builds the
model; the visual decoder's stages use the "visual_decoder" family over the same model config.

A family module defines `FAMILY = Family(...)`:
  build(model_config) -> the flax module the config describes
  example_inputs(model) -> {argument: ShapeDtypeStruct} for `model.init` (shapes only)
  train_flops(abstract_params, model_config, batch, seq_len, image_slots, frozen_towers) -> the
      analytic FLOPs of one train step (model FLOPs: recomputation never counts); None: not counted
  scanned_layers: {tower: its config's layer-count key} of the towers whose layers may be scanned
      (the ahead-of-time compile extrapolates a scanned body's cost over the layers)
  layouts: the released checkpoint layouts (convert/layouts.py) that fill the family's towers

Autoregressive families' models also carry the generation hooks that generate/decoding.py calls
by name (see models/emu.py: `empty_decoding`, `hidden_states`, `next_token_logits`, `regress`,
`embed_tokens`, `embed`). A new family is a new module and one line in `FAMILIES` (and, to convert its released
weights, its key layouts in convert/layouts.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

FAMILIES = {"emu": "emu_jax.models.emu", "visual_decoder": "emu_jax.models.visual_decoder"}


@dataclasses.dataclass(frozen=True)
class Family:
    build: Callable[[Any], Any]
    example_inputs: Callable[[Any], dict]
    train_flops: Callable[..., float] | None = None
    scanned_layers: dict = dataclasses.field(default_factory=dict)
    layouts: tuple[str, ...] = ()


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def of(model_config) -> Family:
    """The family of the autoregressive model `config.model` describes."""
    return get(model_config.get("family", "emu"))

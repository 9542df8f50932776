"""What a conversion will do, decided from key names and shapes alone, before any tensor is read.

`targets(config, layout, mesh)` lists our parameters in the towers the layout covers (shape,
dtype, logical axes, sharding); `make_plan(source, layout, targets)` assigns every source key to
one parameter (and layer, for stacked towers) or to the dropped junk, and raises one
`ConversionError` listing every unexpected, missing, duplicated or mis-shaped key.
"""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import numpy as np

from emu_jax.convert import layouts
from emu_jax.convert.layouts import Layout
from emu_jax.parallel import mesh as mesh_lib

Path = tuple[str, ...]
SHOWN_PER_KIND = 20


class ConversionError(ValueError):
    """The source and the model disagree; the message lists every disagreement by key."""


@dataclasses.dataclass(frozen=True)
class Target:
    shape: tuple[int, ...]  # our full shape (leading layer axis when stacked)
    dtype: object
    axes: tuple  # logical axis names, one per dimension
    sharding: object  # NamedSharding, or None without a mesh

    @property
    def stacked(self) -> bool:
        return bool(self.axes) and self.axes[0] == "layers"

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def layer_axes(self) -> tuple:
        return self.axes[1:] if self.stacked else self.axes

    @property
    def num_layers(self) -> int:
        return self.shape[0] if self.stacked else 1


def _boxed_params(config):
    """Boxed abstract params of the config's model (without LoRA adapters: the released layouts hold
    base weights; see exporter for adapters), plus the decoder's unet and vae when configured."""
    from emu_jax.models import families, lora

    def init(family):
        module = family.build(config.model)
        return jax.eval_shape(lambda kw: module.init(jax.random.key(0), **kw)["params"], family.example_inputs(module))

    boxed = dict(lora.split(dict(init(families.of(config.model))))[0])
    if "unet" in config.model:
        towers = init(families.get("visual_decoder"))
        boxed |= {k: towers[k] for k in ("unet", "vae")}
    return boxed


def targets(config, layout: Layout, mesh=None) -> dict[Path, Target]:
    """Our parameters in the towers `layout` covers, flattened to path tuples."""
    from emu_jax.models import families
    known = families.of(config.model).layouts + (families.get("visual_decoder").layouts if "unet" in config.model else ())
    if layout.name not in known:
        raise ConversionError(f"layout {layout.name} is not a layout of the config's model family "
                              f"{config.model.get('family', 'emu')!r} (its layouts: {', '.join(known)})")
    boxed = _boxed_params(config)
    missing = layout.towers() - set(boxed)
    if missing:
        raise ConversionError(f"layout {layout.name} fills towers {sorted(missing)}, which the config's model lacks "
                              f"(it has {sorted(boxed)}); pick a config that describes them")
    boxed = {k: v for k, v in boxed.items() if k in layout.towers()}
    shardings = mesh_lib.logical_shardings(boxed, mesh, config.mesh.rules) if mesh is not None else None
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
    flat_shardings = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    out = {}
    for (path, box), sharding in zip(flat, flat_shardings):
        value = box.value if is_box(box) else box
        axes = tuple(box.names) if is_box(box) else (None,) * len(value.shape)
        out[tuple(k.key for k in path)] = Target(tuple(value.shape), value.dtype, axes, sharding)
    return out


@dataclasses.dataclass
class Plan:
    layout: Layout
    assignments: dict[Path, dict[int, str]]  # our leaf -> {layer (0 unstacked): source key}
    dropped: list[str]  # junk and carried keys, not converted
    targets: dict[Path, Target]
    carried: list[str] = dataclasses.field(default_factory=list)  # dropped keys kept verbatim for export
    adapters: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # base key -> (lora_A, lora_B)
    lora_alpha: float = 0.0

    def source_keys(self) -> list[str]:
        return [key for layers in self.assignments.values() for key in layers.values()]

    def read(self, source, key: str) -> np.ndarray:
        """One source tensor; a LoRA-wrapped weight merged with its adapter: W + alpha / r * B @ A
        (in float32: adapters are small and bf16 products would round twice)."""
        if key not in self.adapters:
            return source.read(key)
        a, b = (np.asarray(source.read(k), np.float32) for k in self.adapters[key])
        return np.asarray(source.read(key), np.float32) + (self.lora_alpha / a.shape[0]) * (b @ a)


def nested(flat: dict) -> dict:
    """{path tuple: value} -> the nested dict of our parameter trees."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def resolve(layout: Layout, key: str, tree: dict) -> tuple[Path, int] | None:
    """A source key -> (our leaf path, layer index) by walking our parameter tree, or None."""
    parts = layouts.source_to_path(layout, key)
    if parts is None:
        return None
    node, layer = tree, 0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if last and part == "weight" and isinstance(node, dict):
            part = next((leaf for leaf in layouts.LEAF_FOR_WEIGHT if leaf in node), part)
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        stacked = re.fullmatch(r"(.+)_(\d+)", part)
        if stacked and isinstance(node, dict) and stacked.group(1) in node and not last:
            node, layer = node[stacked.group(1)], int(stacked.group(2))
            continue
        return None
    return (node, layer) if isinstance(node, tuple) else None


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:SHOWN_PER_KIND])
    more = f"\n    ... and {len(items) - SHOWN_PER_KIND} more" if len(items) > SHOWN_PER_KIND else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _pair_adapters(layout: Layout, adapters: dict, weights: dict, source) -> tuple[dict, list[str]]:
    """{base key: (lora_A key, lora_B key)} and the problems: an adapter without its pair or its
    base weight, or shapes that do not multiply to the weight's."""
    pairs, problems = {}, []
    for module, halves in adapters.items():
        base = weights.get(module)
        if set(halves) != {"A", "B"} or base is None:
            problems.append(f"{module}: lora_A, lora_B and the base weight must come together "
                            f"(found {sorted(halves) + (['weight'] if base else [])})")
            continue
        a, b, w = (tuple(source.shapes[k]) for k in (halves["A"], halves["B"], base))
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != w:
            problems.append(f"{module}: lora_B {list(b)} @ lora_A {list(a)} does not give the weight's {list(w)}")
            continue
        pairs[base] = (halves["A"], halves["B"])
    return pairs, problems


def make_plan(source, layout: Layout, target: dict[Path, Target], strict: bool = True,
              lora_alpha: float | None = None) -> Plan:
    """`lora_alpha` overrides the layout's (the release's) LoRA alpha for merging adapters."""
    tree = nested({p: p for p in target})
    assignments: dict[Path, dict[int, str]] = {}
    dropped, carried, unexpected, shapes, duplicates, vocab = [], [], [], [], [], []
    adapters: dict[str, dict[str, str]] = {}
    misshaped: set = set()  # reported once, as a shape mismatch, not again as missing
    for key in source.keys():
        if layouts.is_junk(layout, key) or layouts.is_carried(layout, key):
            dropped.append(key)
            if layouts.is_carried(layout, key):
                carried.append(key)
            continue
        adapter = layouts.lora_adapter(layout, key)
        if adapter:
            adapters.setdefault(adapter[0], {})[adapter[1]] = key
            continue
        found = resolve(layout, key, tree)
        if found is None:
            unexpected.append(key)
            continue
        path, layer = found
        t = target[path]
        want = layouts.source_shape(path[-1], t.layer_shape, t.layer_axes)
        have = tuple(source.shapes[key])
        if layer >= t.num_layers:
            unexpected.append(f"{key} (layer {layer}; the model has {t.num_layers})")
        elif have != want:
            misshaped.add((path, layer))
            is_vocab = "vocab" in t.layer_axes and len(have) == len(want) and sum(a != b for a, b in zip(have, want)) == 1
            (vocab if is_vocab else shapes).append(f"{key}: checkpoint {list(have)}, model {list(want)} "
                                                   f"({'/'.join(path)})")
        elif layer in assignments.setdefault(path, {}):
            duplicates.append(f"{key} and {assignments[path][layer]} both fill {'/'.join(path)} layer {layer}")
        else:
            assignments[path][layer] = key
    missing = []
    for path, t in target.items():
        have = assignments.get(path, {})
        for layer in range(t.num_layers):
            if layer not in have and (path, layer) not in misshaped:
                missing.append(layouts.path_to_source(layout, path, layer if t.stacked else None))
    weights = {layouts.lora_module(k): k for layers in assignments.values() for k in layers.values()}
    pairs, lora_problems = _pair_adapters(layout, adapters, weights, source)
    problems = [("vocabulary size differs (not padded; set the config's vocab_size to the checkpoint's)", vocab),
                ("shape mismatches", shapes), ("unexpected keys", unexpected if strict else []),
                ("missing keys", missing), ("keys filling the same parameter", duplicates),
                ("LoRA adapters that cannot be merged", lora_problems)]
    if any(items for _, items in problems):
        body = "\n".join(_listing(title, items) for title, items in problems if items)
        raise ConversionError(f"{source.description} does not match layout {layout.name} and the configured model:\n"
                              f"{body}")
    alpha = lora_alpha if lora_alpha is not None else (layout.lora.alpha if layout.lora else 0.0)
    return Plan(layout, assignments, dropped, target, carried, pairs, alpha)

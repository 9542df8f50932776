"""An Orbax checkpoint (converted or trained) -> safetensors in a released layout.

Parameters are restored one at a time as host arrays and written as a stream, so memory stays
near the largest parameter. For a converted checkpoint the recorded source keys, their order and
dtypes are reproduced, which makes import -> export bit for bit; for a trained one the dtype
comes from `dtype` (default float32). Keys are spelled from our parameter names in the layout's
official spelling, so the official class's `load_state_dict(strict=True)` accepts the file: keys
its state dict has and our model never reads are written from the converted file's carried copy
(or the layout's fills), and LoRA layouts get zero adapters beside the merged weights. With
`max_shard_bytes` the output is a directory of shards plus the Hugging Face index JSON.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

import flax.linen as nn
import jax

from emu_jax import checkpoint
from emu_jax.convert import importer, layouts, plan as plan_lib
from emu_jax.models import families, lora as lora_lib
from emu_jax.convert.tensors import write_safetensors


def _lora_entries(layout: layouts.Layout, key: str, shape: tuple, dtype: str) -> list:
    """The adapters peft's strict load expects beside a wrapped weight: lora_B zeros, so the
    official forward equals the merged weight we hold, and lora_A as peft initialises it (uniform
    within 1/sqrt(in), seeded by the key) so LoRA training can resume from the file."""
    module = layouts.lora_module(key)
    rank, (out_dim, in_dim) = layout.lora.rank, shape

    def lora_a():
        return np.random.default_rng(zlib.crc32(module.encode())).uniform(-in_dim ** -0.5, in_dim ** -0.5, (rank, in_dim))

    return [(f"{module}.lora_A.default.weight", (rank, in_dim), dtype, lora_a),
            (f"{module}.lora_B.default.weight", (out_dim, rank), dtype, lambda: np.zeros((out_dim, rank)))]


def _carried_entries(checkpoint_dir: str, layout: layouts.Layout, config) -> list:
    """Keys the official class saves and our model never reads: the converted file's own tensors
    when the checkpoint carries them, else the layout's fills; a layout whose carried keys have no
    fill (Emu2-Gen's safety checker) cannot be exported from a checkpoint that carries none."""
    if not layout.carried:
        return []
    carried = importer.carried_source(checkpoint_dir)
    if carried is not None:
        return [(k, carried.shapes[k], carried.dtypes[k], lambda k=k: carried.read(k)) for k in carried.keys()]
    if not layout.fills:
        raise plan_lib.ConversionError(
            f"{checkpoint_dir}: layout {layout.name} needs keys matching {list(layout.carried)}, which this "
            f"checkpoint does not carry (it was not converted from a {layout.name} file) and which have no "
            f"initial value; convert the release file first and export from that checkpoint")
    return [(f.key, f.shape(config.model), "float32", lambda f=f: np.full(f.shape(config.model), f.value))
            for f in layout.fills]


class AdapterMerger:
    """Folds a LoRA run's adapters (`config.model.lora`, read from `adapter_dir`) into the base
    kernels they sit beside, one layer at a time: W + alpha / rank * A . B, in float32."""

    def __init__(self, adapter_dir: str, config):
        self.spec = lora_lib.spec(config.model.lora)
        if self.spec is None:
            raise plan_lib.ConversionError(f"--adapter {adapter_dir}: the config has no model.lora (rank 0); give "
                                           f"the config the LoRA run trained with")
        model = families.of(config.model).build(config.model)
        abstract = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw)["params"],
                                  families.of(config.model).example_inputs(model))
        _, adapters = lora_lib.split(nn.unbox(abstract))
        self.modules = {tuple(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
        # one reader each: a reader keeps its last parameter, which serves every layer of a stack
        self.a, self.b = checkpoint.ParamReader(adapter_dir), checkpoint.ParamReader(adapter_dir)

    def __call__(self, path: tuple, value: np.ndarray, layer: int | None) -> np.ndarray:
        if path[-1] != "kernel" or path[:-1] not in self.modules:
            return value
        a, b = self.a.get(path[:-1] + ("lora_a",)), self.b.get(path[:-1] + ("lora_b",))
        if layer is not None:
            a, b = a[layer], b[layer]
        update = np.tensordot(a.astype(np.float32), b.astype(np.float32), axes=1) * self.spec.scale
        return (value.astype(np.float32) + update).astype(value.dtype)

    def close(self) -> None:
        self.a.close()
        self.b.close()


def export_entries(checkpoint_dir: str, layout_name: str, config, dtype: str | None = None,
                   use_recorded: bool = True, adapter_dir: str = ""):
    """(entries for `write_safetensors`, closer): one (key, shape, dtype, produce) per tensor.

    Keys are spelled from our parameter names (what the official class's strict load accepts);
    a converted checkpoint's record gives their order and dtypes. `adapter_dir`: a LoRA run's
    checkpoints, merged into the weights of `checkpoint_dir`."""
    layout = layouts.get_layout(layout_name)
    targets = plan_lib.targets(config, layout)
    record = importer.recorded_source(checkpoint_dir) if use_recorded else None
    if record and record["layout"] != layout.name:
        record = None  # exporting into another layout: our names decide the keys
    tree = plan_lib.nested({p: p for p in targets})
    if record:
        keyed = []
        for key in record["keys"]:
            found = plan_lib.resolve(layout, key, tree)
            if found is None:
                raise plan_lib.ConversionError(f"{checkpoint_dir}: recorded key {key!r} has no parameter in the "
                                               f"configured model; export with the config it was converted with")
            keyed.append((*found, dtype or record["dtypes"][key]))
    else:
        keyed = [(path, layer, dtype or "float32") for path, t in targets.items() for layer in range(t.num_layers)]
    reader = checkpoint.ParamReader(checkpoint_dir)
    merge = AdapterMerger(adapter_dir, config) if adapter_dir else (lambda path, value, layer: value)
    entries = []
    for path, layer, key_dtype in keyed:
        t = targets[path]
        key = layouts.path_to_source(layout, path, layer if t.stacked else None)
        shape = layouts.source_shape(path[-1], t.layer_shape, t.layer_axes)

        def produce(path=path, layer=layer, t=t):
            value = reader.get(path)
            value = merge(path, value[layer] if t.stacked else value, layer if t.stacked else None)
            return layouts.to_source(value, path[-1], t.layer_axes)

        entries.append((key, shape, key_dtype, produce))
        if layout.lora and ".base_layer." in key:
            entries += _lora_entries(layout, key, shape, key_dtype)
    entries += [(k, s, dtype or d, p) for k, s, d, p in _carried_entries(checkpoint_dir, layout, config)]

    def close():
        reader.close()
        if adapter_dir:
            merge.close()
    return entries, close


def export_checkpoint(checkpoint_dir: str, layout_name: str, config, out: str, *, dtype: str | None = None,
                      max_shard_bytes: int | None = None, use_recorded: bool = True, progress: bool = True,
                      adapter_dir: str = "") -> dict:
    """Writes `out` (a .safetensors file), or with `max_shard_bytes` a directory of
    `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`."""
    from tqdm import tqdm
    entries, close = export_entries(checkpoint_dir, layout_name, config, dtype, use_recorded, adapter_dir)
    sizes = [int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d, _ in entries]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="export", disable=not progress)
    try:
        if not max_shard_bytes:
            write_safetensors(out, entries, {"format": "pt"}, on_tensor=bar.update)
            files = [out]
        else:
            shards, current, used = [], [], 0
            for entry, size in zip(entries, sizes):
                if current and used + size > max_shard_bytes:
                    shards.append(current)
                    current, used = [], 0
                current.append(entry)
                used += size
            shards.append(current)
            os.makedirs(out, exist_ok=True)
            weight_map, files = {}, []
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(out, name), shard, {"format": "pt"}, on_tensor=bar.update)
                weight_map |= {key: name for key, *_ in shard}
                files.append(os.path.join(out, name))
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
    finally:
        bar.close()
        close()
    return {"tensors": len(entries), "bytes": sum(sizes), "files": files}

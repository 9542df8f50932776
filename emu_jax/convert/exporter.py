"""An Orbax checkpoint (converted or trained) -> safetensors in a released layout.

Parameters are restored one at a time as host arrays and written as a stream, so memory stays
near the largest parameter. For a converted checkpoint the recorded source keys, their order and
dtypes are reproduced, which makes import -> export bit for bit; for a trained one the dtype
comes from `dtype` (default float32). Keys are spelled from our parameter names in the layout's
official spelling, so the official class's `load_state_dict(strict=True)` accepts the file: keys
its state dict has and our model never reads are written from the converted file's carried copy
(or the layout's fills), and LoRA layouts get peft adapters beside the weights (zero, or a LoRA
run's, unmerged). With `max_shard_bytes` the output is a directory of shards plus the Hugging Face
index JSON. `export_peft` writes a LoRA run's LLM adapters as a peft adapter directory.
"""
from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np

import flax.linen as nn
import jax

from emu_jax import checkpoint
from emu_jax.convert import importer, layouts, plan as plan_lib
from emu_jax.models import families, lora as lora_lib
from emu_jax.convert.tensors import write_safetensors


def _peft_initial_a(module: str, rank: int, in_dim: int) -> np.ndarray:
    """lora_A rows as peft initialises them (uniform within 1/sqrt(in)), seeded by the module's key
    so that export is deterministic and LoRA training can resume from the file."""
    return np.random.default_rng(zlib.crc32(module.encode())).uniform(-in_dim ** -0.5, in_dim ** -0.5, (rank, in_dim))


def _lora_entries(layout: layouts.Layout, key: str, shape: tuple, dtype: str, factors=None) -> list:
    """The adapters peft's strict load expects beside a wrapped weight. Without `factors` (no
    adapter of ours sits there): lora_B zeros, so the official forward equals the weight we hold.
    With `factors` (a trained adapter's per-layer (a, b, scale)): written unmerged at the release's
    rank and alpha (Emu1/inference.py builds the peft wrapper with r=16, alpha=16 whatever the file
    holds): A's extra rows as peft initialises them, B's extra columns zero and B rescaled by our
    scale over the release's, so lora_B @ lora_A * alpha / r is our update exactly."""
    module = layouts.lora_module(key)
    rank, (out_dim, in_dim) = layout.lora.rank, shape

    def lora_a():
        initial = _peft_initial_a(module, rank, in_dim)
        if factors is not None:
            a = factors()[0].reshape(in_dim, -1).T
            initial[:a.shape[0]] = a
        return initial

    def lora_b():
        b = np.zeros((out_dim, rank))
        if factors is not None:
            _, ours, scale = factors()
            ours = ours.reshape(ours.shape[0], out_dim).T
            b[:, :ours.shape[1]] = ours * (scale / (layout.lora.alpha / rank))
        return b

    return [(f"{module}.lora_A.default.weight", (rank, in_dim), dtype, lora_a),
            (f"{module}.lora_B.default.weight", (out_dim, rank), dtype, lora_b)]


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


class Adapters:
    """A LoRA run's adapters (`config.model.lora`, read from `adapter_dir` one tensor at a time):
    which projections carry them, their per-layer factors, and the merge W + alpha / rank * A . B."""

    def __init__(self, adapter_dir: str, config):
        self.spec = lora_lib.required_spec(config.model.lora, adapter_dir)
        model = families.of(config.model).build(config.model)
        abstract = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw)["params"],
                                  families.of(config.model).example_inputs(model))
        _, adapters = lora_lib.split(nn.unbox(abstract))
        self.modules = {tuple(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
        # one reader each: a reader keeps its last parameter, which serves every layer of a stack
        self.a, self.b = checkpoint.ParamReader(adapter_dir), checkpoint.ParamReader(adapter_dir)

    def adapts(self, path: tuple) -> bool:
        """Whether the kernel at `path` carries an adapter."""
        return path[-1] == "kernel" and path[:-1] in self.modules

    def factors(self, path: tuple, layer: int | None) -> tuple[np.ndarray, np.ndarray, float]:
        """(A [*in, rank], B [rank, *out], alpha / rank) of the kernel at `path` (one layer of a stack)."""
        a, b = self.a.get(path[:-1] + ("lora_a",)), self.b.get(path[:-1] + ("lora_b",))
        if layer is not None:
            a, b = a[layer], b[layer]
        return a.astype(np.float32), b.astype(np.float32), self.spec.scale

    def merged(self, path: tuple, value: np.ndarray, layer: int | None) -> np.ndarray:
        if not self.adapts(path):
            return value
        a, b, scale = self.factors(path, layer)
        return (value.astype(np.float32) + np.tensordot(a, b, axes=1) * scale).astype(value.dtype)

    def close(self) -> None:
        self.a.close()
        self.b.close()


def export_entries(checkpoint_dir: str, layout_name: str, config, dtype: str | None = None,
                   use_recorded: bool = True, adapter_dir: str = ""):
    """(entries for `write_safetensors`, closer): one (key, shape, dtype, produce) per tensor.

    Keys are spelled from our parameter names (what the official class's strict load accepts);
    a converted checkpoint's record gives their order and dtypes. `adapter_dir`: a LoRA run's
    checkpoints, merged into the weights of `checkpoint_dir`, except where the layout itself wraps
    the projection in peft LoRA (Emu-I): there the adapters are written unmerged."""
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
    adapters = Adapters(adapter_dir, config) if adapter_dir else None
    entries = []
    for path, layer, key_dtype in keyed:
        t = targets[path]
        layer = layer if t.stacked else None
        key = layouts.path_to_source(layout, path, layer)
        shape = layouts.source_shape(path[-1], t.layer_shape, t.layer_axes)
        wrapped = layout.lora is not None and ".base_layer." in key
        unmerged = wrapped and adapters is not None and adapters.adapts(path)
        if unmerged and adapters.spec.rank > layout.lora.rank:
            raise plan_lib.ConversionError(
                f"--adapter {adapter_dir}: rank-{adapters.spec.rank} adapters do not fit layout {layout.name}'s "
                f"rank-{layout.lora.rank} peft wrapper (the official code builds it with that rank); export them "
                f"merged into a layout without LoRA, or as a peft adapter directory (--peft)")

        def produce(path=path, layer=layer, t=t, merge=adapters is not None and not unmerged):
            value = reader.get(path)
            value = value[layer] if layer is not None else value
            value = adapters.merged(path, value, layer) if merge else value
            return layouts.to_source(value, path[-1], t.layer_axes)

        entries.append((key, shape, key_dtype, produce))
        if wrapped:
            factors = (lambda path=path, layer=layer: adapters.factors(path, layer)) if unmerged else None
            entries += _lora_entries(layout, key, shape, key_dtype, factors)
    entries += [(k, s, dtype or d, p) for k, s, d, p in _carried_entries(checkpoint_dir, layout, config)]

    def close():
        reader.close()
        if adapters is not None:
            adapters.close()
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


PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # where peft's PeftModel keeps the wrapped model


def _peft_target_modules(adapted: list[str], every: list[str]) -> list[str]:
    """peft's `target_modules`: the projections' short names when each module of those names is
    adapted (Emu-I's ["q_proj", ...]), else the adapted modules' full names (peft matches either)."""
    short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    covered = [m for m in every if m.rsplit(".", 1)[-1] in short]
    return short if sorted(covered) == sorted(adapted) else sorted(adapted)


def export_peft(adapter_dir: str, config, out: str, dtype: str = "float32") -> dict:
    """A LoRA run's LLM adapters as a peft adapter directory: `adapter_model.safetensors` (keys
    `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, lora_A [r, in], lora_B [out, r])
    and `adapter_config.json`, which `PeftModel.from_pretrained(llm, out)` loads onto the release's
    LlamaForCausalLM (Emu1 and Emu2 keep it at `decoder.lm`)."""
    adapters = Adapters(adapter_dir, config)
    foreign = sorted("/".join(m) for m in adapters.modules if m[0] != "llm")
    if foreign:
        adapters.close()
        raise plan_lib.ConversionError(
            f"--adapter {adapter_dir}: a peft adapter file wraps the LLM (LlamaForCausalLM) alone, and this run "
            f"also adapts {foreign[:3]}{' ...' if len(foreign) > 3 else ''}; export merged into a release layout")
    layout = layouts.get_layout("llama_hf")
    targets = plan_lib.targets(config, layout)
    rank, entries, adapted, every = adapters.spec.rank, [], [], []
    for path, t in targets.items():
        for layer in range(t.num_layers):
            layer = layer if t.stacked else None
            module = layouts.path_to_source(layout, path, layer).removesuffix(".weight")
            if path[-1] != "kernel":
                continue
            every.append(module)
            if not adapters.adapts(path):
                continue
            adapted.append(module)
            in_dim = math.prod(t.layer_shape[:layouts.input_dims(t.layer_axes)])
            out_dim = math.prod(t.layer_shape) // in_dim
            produce_a = lambda path=path, layer=layer, n=in_dim: adapters.factors(path, layer)[0].reshape(n, -1).T  # noqa: E731
            produce_b = lambda path=path, layer=layer, n=out_dim: adapters.factors(path, layer)[1].reshape(-1, n).T  # noqa: E731
            entries += [(f"{PEFT_PREFIX}{module}.lora_A.weight", (rank, in_dim), dtype, produce_a),
                        (f"{PEFT_PREFIX}{module}.lora_B.weight", (out_dim, rank), dtype, produce_b)]
    try:
        os.makedirs(out, exist_ok=True)
        size = write_safetensors(os.path.join(out, PEFT_WEIGHTS), entries, {"format": "pt"})
    finally:
        adapters.close()
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": adapters.spec.alpha,
                   "lora_dropout": adapters.spec.dropout, "bias": "none", "fan_in_fan_out": False,
                   "target_modules": _peft_target_modules(adapted, every), "inference_mode": True,
                   "base_model_name_or_path": None, "modules_to_save": None}
    with open(os.path.join(out, PEFT_CONFIG), "w") as f:
        json.dump(peft_config, f, indent=2)
    return {"tensors": len(entries), "bytes": size, "files": [os.path.join(out, PEFT_WEIGHTS),
                                                              os.path.join(out, PEFT_CONFIG)]}

"""Where each released checkpoint keeps each tower, and how one key becomes one of our parameters.

A layout is a prefix table (source key prefix -> our tower path), a few aliases older files use,
and the keys known to be junk. Below the prefix, names translate generically: `blocks.3.attn.qkv`
-> `blocks_3/attn/qkv` (diffusers' `ff.net.0.proj` -> `ff/net_0_proj`); a trailing `weight` is
whichever of kernel / scale / embedding the target module has. When the target stacks a layer
list (scanned towers), `blocks_3` becomes layer 3 of `blocks`.

Tensor layouts: PyTorch Linear [out, in] -> kernel [*in_axes, *out_axes] (attention output
projections contract two axes, heads and head_dim); conv OIHW -> HWIO; the rest reshapes (EVA's
q/v biases [W] -> [heads, head_dim]). The logical axis names of the target decide each case, so
export inverts import without a table of its own.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

JUNK_EVERYWHERE = (r"(^|\.)rotary_emb\.inv_freq$",)


@dataclasses.dataclass(frozen=True)
class Lora:
    """peft LoRA adapters on some Linear layers, merged on import: W + alpha / r * B @ A."""
    targets: tuple[str, ...]  # module names wrapped by peft (their weight lives at `<name>.base_layer.weight`)
    alpha: float  # the release's LoraConfig.lora_alpha (r is read from lora_A's shape)
    rank: int  # the release's r: the shape of the (zero) adapters export writes


@dataclasses.dataclass(frozen=True)
class Fill:
    """A key the official class's state dict has and our model does not use, with the value
    export writes when the checkpoint carries none (one trained here, not converted)."""
    key: str
    shape: Callable  # config.model -> shape
    value: float


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    prefixes: tuple[tuple[str, str], ...]  # (source prefix, our path prefix); whole keys end without "."
    aliases: tuple[tuple[str, str], ...] = ()  # older spellings, rewritten before the prefix table
    junk: tuple[str, ...] = ()  # regexes of keys dropped by name (reported, never converted, never exported)
    # regexes of keys the official class saves and our model never reads: dropped from our params
    # like junk, but kept verbatim beside the checkpoint so that export writes what the official
    # strict `load_state_dict` accepts
    carried: tuple[str, ...] = ()
    fills: tuple[Fill, ...] = ()  # carried keys export can write without a carried copy
    lora: Lora | None = None
    describe: str = ""

    def towers(self) -> set[str]:
        return {ours.split("/")[0] for _, ours in self.prefixes}


def _emu2_prefixes(source: str = "") -> tuple[tuple[str, str], ...]:
    """EmuModel's own attribute names (Emu2/emu/emu.py): project_up/down sit beside `decoder`."""
    return ((f"{source}visual.", "vit/"),
            (f"{source}project_up.", "connector/project_up/"),
            (f"{source}project_down.", "connector/project_down/"),
            (f"{source}decoder.lm.model.", "llm/"),
            (f"{source}decoder.lm.lm_head.", "llm/lm_head/"))


def _emu1_prefixes(lm: str) -> tuple[tuple[str, str], ...]:
    """Emu1's `Emu` (Emu1/models/modeling_emu.py); `lm` is where its LlamaForCausalLM sits."""
    return (("visual.", "vit/"),
            ("ln_visual.", "connector/ln_visual/"),
            ("cformer.causal_tokens", "connector/cformer/causal_tokens"),
            ("cformer.projection.", "connector/cformer/projection/"),
            ("cformer.cformer.block.0.layer.0.SelfAttention.relative_attention_bias.",
             "connector/cformer/cformer/relative_attention_bias/"),
            ("cformer.cformer.", "connector/cformer/cformer/"),
            (f"{lm}stu_regress_head.", "connector/stu_regress_head/"),
            (f"{lm}model.", "llm/"),
            (f"{lm}lm_head.", "llm/lm_head/"))


# Emu1's EVA keeps the CLIP head it never calls (norm, then Linear to Emu-14B.json's embed_dim
# 1024), and its T5 decoder stack keeps the embedding of t5-base's 32128 tokens (Emu feeds it
# queries, never ids). Export without a carried copy writes their release initial values where
# the release sets them (LayerNorm 1 and 0, head bias 0) and zeros for the random ones: no forward
# pass reads them.
_EMU1_CARRIED = (r"^visual\.(norm|head)\.", r"^cformer\.cformer\.embed_tokens\.weight$")
_EMU1_FILLS = (Fill("visual.norm.weight", lambda m: (m.vit.width,), 1.0),
               Fill("visual.norm.bias", lambda m: (m.vit.width,), 0.0),
               Fill("visual.head.weight", lambda m: (1024, m.vit.width), 0.0),
               Fill("visual.head.bias", lambda m: (1024,), 0.0),
               Fill("cformer.cformer.embed_tokens.weight", lambda m: (32128, m.connector.d_model), 0.0))
# Emu1/inference.py wraps Emu-I's LLM as get_peft_model(lm, LoraConfig(r=16, lora_alpha=16,
# target_modules=[q_proj, k_proj, v_proj, o_proj])).
EMU1_LORA = Lora(("q_proj", "k_proj", "v_proj", "o_proj"), alpha=16.0, rank=16)

LAYOUTS = {layout.name: layout for layout in (
    Layout("emu1", _emu1_prefixes("decoder.lm."), carried=_EMU1_CARRIED, fills=_EMU1_FILLS,
           describe="Emu1 release: BAAI/Emu pretrain/multimodal_encoder/pytorch_model.bin (possibly under 'module')"),
    Layout("emu1_instruct", _emu1_prefixes("decoder.lm.base_model.model."), carried=_EMU1_CARRIED,
           fills=_EMU1_FILLS, lora=EMU1_LORA,
           describe="Emu-I release: BAAI/Emu Emu-instruct.pt (LLM wrapped in peft LoRA; merged on import)"),
    Layout("emu2", _emu2_prefixes(),
           describe="Emu2 / Emu2-Chat native EmuModel state dict (.bin or safetensors)"),
    Layout("emu2_hf", (("model.visual.", "vit/"), ("model.decoder.lm.model.", "llm/"),
                       ("model.decoder.lm.lm_head.", "llm/lm_head/"), ("project_up.", "connector/project_up/"),
                       ("project_down.", "connector/project_down/")),
           describe="Emu2 / Emu2-Chat Hugging Face export ('model.' prefix, project_up/down at top level)"),
    Layout("emu2_gen", _emu2_prefixes("multimodal_encoder.") + (("unet.", "unet/"), ("vae.", "vae/")),
           carried=(r"^safety_checker\.",),
           describe="Emu2-Gen native EmuVisualGeneration file (multimodal_encoder, unet, vae, safety_checker)"),
    Layout("llama_hf", (("model.", "llm/"), ("lm_head.", "llm/lm_head/")),
           describe="Hugging Face LlamaForCausalLM (initialises the llm tower)"),
    Layout("eva_timm", (("", "vit/"),), junk=(r"^(norm|fc_norm|head)\.",),
           describe="timm EVA / EVA-CLIP vision tower (initialises the vit tower; its final norm/head dropped)"),
    Layout("diffusers_unet", (("", "unet/"),), describe="diffusers UNet2DConditionModel"),
    Layout("diffusers_vae", (("", "vae/"),), describe="diffusers AutoencoderKL"),
)}

LEAF_FOR_WEIGHT = ("kernel", "scale", "embedding")
STACK_NAMES = ("blocks", "layers", "block")  # the towers' layer lists (EvaVit, Llama, T5 stack), scanned or not
_KEEP_UNDERSCORE = re.compile(r"^linear_\d+$")  # diffusers' TimestepEmbedding really says linear_1


def _is_prefix(source: str) -> bool:
    """Entries ending in "." (or empty) claim every key below them; others name one whole key."""
    return source == "" or source.endswith(".")


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name]


def is_junk(layout: Layout, key: str) -> bool:
    return any(re.search(p, key) for p in JUNK_EVERYWHERE + layout.junk)


def is_carried(layout: Layout, key: str) -> bool:
    return any(re.search(p, key) for p in layout.carried)


_ADAPTER = re.compile(r"^(.+)\.lora_([AB])\.default\.weight$")
_BASE_LAYER = ".base_layer."


def lora_adapter(layout: Layout, key: str) -> tuple[str, str] | None:
    """(the wrapped module's key prefix, "A" or "B") for a peft adapter key of a LoRA layout."""
    found = _ADAPTER.match(key) if layout.lora else None
    return (found.group(1), found.group(2)) if found else None


def lora_module(key: str) -> str:
    """The module prefix of a weight key: `...q_proj.base_layer.weight` (current peft) and
    `...q_proj.weight` (peft before 0.7) both -> `...q_proj`."""
    return key.removesuffix(".weight").removesuffix(".base_layer")


def _apply_aliases(layout: Layout, key: str) -> str:
    if layout.lora:
        key = key.replace(_BASE_LAYER, ".")
    for old, new in layout.aliases:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def source_to_path(layout: Layout, key: str) -> list[str] | None:
    """A source key -> our path components (leaf still in source spelling), or None when no
    prefix of the layout claims the key."""
    key = _apply_aliases(layout, key)
    for source, ours in sorted(layout.prefixes, key=lambda p: -len(p[0])):
        if not _is_prefix(source):
            if key == source:
                return ours.split("/")
            continue
        if key.startswith(source):
            rest = re.sub(r"\bnet\.0\.proj\b", "net_0_proj", key[len(source):])
            rest = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", rest)
            return ours.rstrip("/").split("/") + rest.split(".")
    return None


def unstacked_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """A stacked leaf's path for one layer: ("llm", "layers", ...) -> ("llm", "layers_3", ...)."""
    i = next(i for i, part in enumerate(path) if part in STACK_NAMES)
    return path[:i] + (f"{path[i]}_{layer}",) + path[i + 1:]


def path_to_source(layout: Layout, path: tuple[str, ...], layer: int | None = None) -> str:
    """Inverse of `source_to_path` for a full leaf path of ours (leaf names included); `layer`
    picks one layer of a stacked leaf."""
    joined = "/".join(path if layer is None else unstacked_path(path, layer))
    for source, ours in sorted(layout.prefixes, key=lambda p: -len(p[1])):
        if not _is_prefix(source):
            if joined == ours:
                return source
            continue
        if joined.startswith(ours):
            parts = joined[len(ours):].split("/")
            leaf = "weight" if parts[-1] in LEAF_FOR_WEIGHT else parts[-1]
            names = [p if _KEEP_UNDERSCORE.match(p) else re.sub(r"_(\d+)$", r".\1", p) for p in parts[:-1]]
            if layout.lora and names and names[-1] in layout.lora.targets:
                names.append("base_layer")  # what current peft's state_dict() names the wrapped weight
            rest = ".".join(names + [leaf]).replace("net_0_proj", "net.0.proj")
            return source + rest
    raise KeyError(f"layout {layout.name} has no source prefix for {joined}")


# ----------------------------------------------------------------------------- tensor transforms

def _is_conv(axes) -> bool:
    return bool(axes) and axes[0] in ("conv_height", "patch_height")


def input_dims(axes) -> int:
    return 2 if tuple(axes[:2]) == ("heads", "head_dim") else 1


def source_shape(leaf: str, shape: tuple[int, ...], axes: tuple) -> tuple[int, ...]:
    """The PyTorch-side shape of one (per-layer) parameter of ours."""
    if leaf == "kernel" and _is_conv(axes):
        h, w, i, o = shape
        return (o, i, h, w)
    if leaf == "kernel":
        n = input_dims(axes)
        return (math.prod(shape[n:]), math.prod(shape[:n]))
    if leaf in ("bias", "scale", "q_bias", "v_bias"):
        return (math.prod(shape),)
    return tuple(shape)


def to_ours(array, leaf: str, shape: tuple[int, ...], axes: tuple):
    """A PyTorch tensor -> our per-layer parameter of `shape` (numpy or jax arrays: array methods only)."""
    if leaf == "kernel" and _is_conv(axes):
        return array.transpose((2, 3, 1, 0))
    if leaf == "kernel":
        return array.T.reshape(shape)
    return array.reshape(shape)


def moves_data(leaf: str) -> bool:
    """Whether `to_ours` reorders the bytes of a leaf (a transpose), not only its shape."""
    return leaf == "kernel"


def to_source(array: np.ndarray, leaf: str, axes: tuple) -> np.ndarray:
    """Inverse of `to_ours`."""
    if leaf == "kernel" and _is_conv(axes):
        return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
    if leaf == "kernel":
        n = input_dims(axes)
        return np.ascontiguousarray(array.reshape(math.prod(array.shape[:n]), -1).T)
    return array.reshape(source_shape(leaf, array.shape, axes))

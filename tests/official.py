"""The official Emu release (`shared/reference/baaivision-emu`, unmodified) imported for tests.

The release is GPU inference code; on a CPU it needs only import-level stand-ins, none of which
changes its math (see `shared/reference/README.md`):
- `xformers.ops.memory_efficient_attention(q, k, v, attn_bias=None, p=0., scale=None)` in the layout
  [B, N, heads, C]: softmax(q k^T * scale) v (a `LowerTriangularMask` bias masks the future);
- `decord` (Emu1's video reader) imported at module level and never called here;
- `transformers.pytorch_utils.find_pruneable_heads_and_indices`, which Emu1's T5 copy imports for
  head pruning (never called) and transformers 5 no longer has.

Each release package is loaded under its own name (`emu1_release` for `Emu1/models`,
`emu2_release` for `Emu2/emu`), so their relative imports work and neither shadows our modules.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types


def _find_reference() -> pathlib.Path:
    """`shared/reference` beside the checkout (or inside it): where the project's shared files are laid."""
    for parent in pathlib.Path(__file__).resolve().parents:
        if (parent / "shared" / "reference").is_dir():
            return parent / "shared" / "reference"
    raise FileNotFoundError(f"no shared/reference beside or above {__file__}: the official release the tests "
                            f"compare with is laid there")


REFERENCE = _find_reference()
RELEASE = REFERENCE / "baaivision-emu"
VQA = REFERENCE / "gt-vision-lab-vqa"

# The release's own files: tokenizers (LLaMA's sentencepiece model with Emu's added tokens) and configs.
EMU1_LLAMA_CONFIG = RELEASE / "Emu1" / "models" / "llama_config"
EMU2_LLAMA_CONFIG = RELEASE / "Emu2" / "emu" / "conf" / "llama_config"
EMU2_DIFFUSION_CONFIG = RELEASE / "Emu2" / "emu" / "conf" / "diffusion_config"


class _LowerTriangularMask:
    """xformers' causal mask marker."""


def _memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None, op=None):
    import torch
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, N, C]
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if isinstance(attn_bias, _LowerTriangularMask):
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(m - n + 1)
        scores = scores.masked_fill(future, float("-inf"))
    elif attn_bias is not None:
        scores = scores + attn_bias
    return torch.matmul(scores.softmax(-1), v).transpose(1, 2)


def _stand_in(name: str) -> types.ModuleType:
    """An empty module with a spec (libraries probe `find_spec`; no installed version means they
    treat the package as absent and do not call it)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _never_called(*args, **kwargs):
    raise NotImplementedError("a stand-in for an import the release makes but never calls here")


def _install_stand_ins() -> None:
    if "xformers" not in sys.modules:
        xformers, ops = _stand_in("xformers"), _stand_in("xformers.ops")
        ops.memory_efficient_attention = _memory_efficient_attention
        ops.LowerTriangularMask = _LowerTriangularMask
        xformers.ops = ops
        sys.modules.update({"xformers": xformers, "xformers.ops": ops})
    sys.modules.setdefault("decord", _stand_in("decord"))
    import transformers.pytorch_utils as pytorch_utils
    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):  # gone in transformers 5; only
        pytorch_utils.find_pruneable_heads_and_indices = _never_called  # T5's head pruning, unused


def _load_package(name: str, directory: pathlib.Path) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    _install_stand_ins()
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


@functools.cache
def emu1(module: str) -> types.ModuleType:
    """A module of Emu1's `models` package, e.g. `emu1("modeling_emu")`."""
    package = _load_package("emu1_release", RELEASE / "Emu1" / "models")
    # Emu1 imports its LLaMA wrapper absolutely, `from models.modeling_llama import ...`, inside
    # `Emu.__init__`, `generate` and `_predict`: the same module object under that name too.
    sys.modules.setdefault("models", package)
    sys.modules.setdefault("models.modeling_llama", importlib.import_module("emu1_release.modeling_llama"))
    return importlib.import_module(f"emu1_release.{module}")


@functools.cache
def emu2(module: str) -> types.ModuleType:
    """A module of Emu2's `emu` package, e.g. `emu2("emu")`, `emu2("constants")`."""
    _load_package("emu2_release", RELEASE / "Emu2" / "emu")
    return importlib.import_module(f"emu2_release.{module}")

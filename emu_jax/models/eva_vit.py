"""EVA-CLIP vision transformer: Emu's EVA-01-CLIP-g/14 (pre-norm) and Emu2's EVA-02-CLIP-E/14+ (post-norm).

    image -> patch_embed (conv p x p, stride p) -> [CLS] + patches -> + pos_embed (bicubic-resized
    when the patch grid differs from the checkpoint's) -> blocks x depth -> all tokens, no final norm

    pre-norm block:   x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    post-norm block:  x = x + norm1(attn(x));  x = x + norm2(mlp(x))

Attention is one fused qkv kernel without bias plus separate q and v biases (k has none); the MLP
is fc1 -> exact GELU -> fc2 with biases. Names follow `visual.*` in the released checkpoints.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emu_jax.models import layers
from emu_jax.models.layers import Attention, Mlp, constrain

EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP image normalisation, used by both EVA variants
EVA_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] (or 0-255 floats) -> float32 with the EVA-CLIP mean and std: what the towers
    read. Models take uint8 images and call this themselves (on device, inside the step)."""
    mean = jnp.asarray(EVA_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(EVA_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] weights of PyTorch's `interpolate(mode="bicubic", align_corners=False)` along one
    axis (cubic convolution with a = -0.75, border taps clamped), which EVA-CLIP uses to resize
    position embeddings; numpy so that it is a compile-time constant."""
    def cubic(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    weights = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * in_size / out_size - 0.5
        base = int(np.floor(src))
        frac = src - base
        for tap in range(-1, 3):
            weights[o, min(max(base + tap, 0), in_size - 1)] += cubic(tap - frac)
    return weights.astype(np.float32)


def resize_pos_embed(pos_embed: jnp.ndarray, grid: tuple[int, int]) -> jnp.ndarray:
    """pos_embed [1, 1 + G*G, W] (CLS first) -> [1, 1 + grid[0]*grid[1], W]."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(patch_pos.shape[1] ** 0.5))
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position embedding has {patch_pos.shape[1]} patch entries, not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    patch_pos = patch_pos.reshape(old, old, -1)
    rows, cols = bicubic_matrix(old, grid[0]), bicubic_matrix(old, grid[1])
    resized = jnp.einsum("ah,hwc,bw->abc", rows, patch_pos.astype(jnp.float32), cols)
    return jnp.concatenate([cls_pos, resized.reshape(1, -1, pos_embed.shape[-1]).astype(pos_embed.dtype)], 1)


class PatchEmbed(nn.Module):
    width: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        proj = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="proj", dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       kernel_init=layers.partitioned(layers.default_init, ("patch_height", "patch_width", "channels", "embed")),
                       bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
        x = proj(images.astype(self.dtype))
        return x.reshape(x.shape[0], -1, self.width), x.shape[1:3]


class EvaBlock(nn.Module):
    width: int
    num_heads: int
    mlp_hidden: int
    post_norm: bool = False
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = layers.layer_norm(self.norm_eps, name=None, **kw)
        self.attn = Attention(self.num_heads, self.width // self.num_heads, fused_qkv=True, qv_bias=True,
                              out_bias=True, names=("qkv", "proj"), implementation=self.attention_impl, lora=self.lora,
                              **kw)
        self.norm2 = layers.layer_norm(self.norm_eps, name=None, **kw)
        self.mlp = Mlp(self.mlp_hidden, activation="gelu", use_bias=True, names=("fc1", "fc2"), lora=self.lora, **kw)

    def __call__(self, x, unused_cache, unused_shared):
        attend = lambda h: self.attn(h)[0]  # noqa: E731
        if self.post_norm:
            x = x + self.norm1(attend(x))
            x = x + self.norm2(self.mlp(x))
        else:
            x = x + attend(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        return constrain(x, ("act_batch", "act_len", "act_embed")), None


class EvaVit(nn.Module):
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_hidden: int
    post_norm: bool = False
    norm_eps: float = 1e-6
    pos_embed_grid: int = 0  # the checkpoint's patch grid; 0: image_size // patch_size
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = self.pos_embed_grid or self.image_size // self.patch_size
        self.patch_embed = PatchEmbed(self.width, self.patch_size, **kw)
        self.cls_token = self.param("cls_token", layers.partitioned(layers.default_init, (None, None, "embed")),
                                    (1, 1, self.width), self.param_dtype)
        self.pos_embed = self.param("pos_embed", layers.partitioned(layers.default_init, (None, None, "embed")),
                                    (1, 1 + grid * grid, self.width), self.param_dtype)
        self.blocks = layers.make_stack(
            EvaBlock, self.depth, scan=self.scan_layers, remat=self.remat, width=self.width,
            num_heads=self.num_heads, mlp_hidden=self.mlp_hidden, post_norm=self.post_norm,
            norm_eps=self.norm_eps, attention_impl=self.attention_impl, lora=self.lora, **kw)

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """images [N, H, W, 3], normalised -> tokens [N, 1 + (H/p)(W/p), width] of the last block."""
        if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch {self.patch_size}")
        x, grid = self.patch_embed(images)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + resize_pos_embed(self.pos_embed, grid).astype(self.dtype)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        x, _ = layers.apply_stack(self.blocks, self.depth, x)
        return x

"""Emu2's connector: pool EVA tokens into a small grid and project them up into LLaMA.

    ViT tokens [N, 1 + G*G, 1792] -> drop CLS -> [G, G] grid -> average-pool to n x n (8 x 8; the
    chat variant 16 x 16) -> row-major flatten -> regression targets [N, n*n, 1792]
                                                -> project_up (no bias) -> LLM inputs [N, n*n, 6656]
    a video frame: the same, pooled to the video grid (8 x 8 in both variants: the release's
    `v_query` 64) -> LLM inputs at the frame's [gIMG] positions
    LLM hidden states -> project_down (no bias) -> regressed EVA-space embeddings [.., 1792],
    fed back to the LLM through project_up.

Names follow the released checkpoint (`project_up`, `project_down` at its top level).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from emu_jax.models import layers


def pool_patch_grid(vit_tokens: jnp.ndarray, pool_grid: int) -> jnp.ndarray:
    """[N, 1 + G*G, W] -> [N, pool_grid**2, W]: drop CLS, average non-overlapping windows."""
    patches = vit_tokens[:, 1:]
    n, count, width = patches.shape
    grid = int(round(count ** 0.5))
    if grid * grid != count or grid % pool_grid:
        raise ValueError(f"cannot pool a patch grid of {count} tokens into {pool_grid}x{pool_grid}: "
                         f"the grid must be square and divisible by {pool_grid}")
    k = grid // pool_grid
    pooled = patches.reshape(n, pool_grid, k, pool_grid, k, width).astype(jnp.float32).mean(axis=(2, 4))
    return pooled.reshape(n, pool_grid * pool_grid, width).astype(vit_tokens.dtype)


class PooledConnector(nn.Module):
    vision_width: int
    llm_hidden: int
    pool_grid: int = 8
    video_pool_grid: int = 8
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: layers.lora_lib.LoraSpec | None = None

    @property
    def num_visual_tokens(self) -> int:
        return self.pool_grid ** 2

    @property
    def num_frame_tokens(self) -> int:
        return self.video_pool_grid ** 2

    @property
    def target_width(self) -> int:
        return self.vision_width

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        self.project_up = layers.dense(self.llm_hidden, ("mlp", "embed"), name=None, **kw)
        self.project_down = layers.dense(self.vision_width, ("embed", "mlp"), name=None, **kw)

    def encode(self, vit_tokens):
        """ViT tokens -> (LLM input embeddings, regression targets in EVA space)."""
        pooled = pool_patch_grid(vit_tokens, self.pool_grid)
        return self.project_up(pooled), pooled

    def encode_frames(self, vit_tokens):
        """ViT tokens of video frames -> their LLM input embeddings (pooled to the video grid)."""
        return self.project_up(pool_patch_grid(vit_tokens, self.video_pool_grid))

    def regress(self, hidden):
        return self.project_down(hidden)

    def feed_back(self, regressed):
        return self.project_up(regressed)

"""Emu: one autoregressive model over interleaved text tokens and visual embeddings.

    images [B, N, H, W, 3] -> vit -> connector.encode -> visual inputs [B, N*n, D_llm]
                                                       + regression targets [B, N*n, D_target]
    tokens [B, T] -> llm.embed -> the k-th `<image>` token (row order) takes visual input k
                  -> llm (causal, packed by segment ids) -> final-normed hidden states
                  -> llm.logits (next text token)   and   connector.regress (next visual embedding)

Each image is one block `[IMG] <image> x n [/IMG]` in `tokens` and one slot in `images`, in the
same order; an Emu2 video frame is one block `[IMG] [gIMG] x m [/IMG]` and one slot, its m
embeddings pooled to the connector's video grid (see `emu_jax.tokens`). The regression
target of position t is the visual target of position t + 1 when that position is an `<image>`,
so predictions at `[IMG]` and at every `<image>` but a block's last are scored (the loss applies
the masks; see `emu_jax.tokens`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from emu_jax import tokens as tokens_lib
from emu_jax.models import families
from emu_jax.models import lora as lora_lib
from emu_jax.models.causal_former import CausalFormerConnector
from emu_jax.models.connector import PooledConnector
from emu_jax.models.eva_vit import EvaVit, normalize
from emu_jax.models.llama import Llama

CONNECTORS = {"causal_former": CausalFormerConnector, "pooled": PooledConnector}


class EmuOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab]: next-token logits
    regression: jax.Array  # [B, T, D_target]: predicted next visual embedding
    regression_targets: jax.Array  # [B, T, D_target]: the next position's visual target (zeros if none)
    cache: Any  # updated KV cache, or None


def block_offsets(tokens: jax.Array, start_id: int) -> tuple[jax.Array, jax.Array]:
    """For each position of tokens [B, T]: (index of the image block it is in, counting the
    `[IMG]`s up to it from 0; its offset after that block's `[IMG]`)."""
    is_start = tokens == start_id
    block = jnp.cumsum(is_start, axis=1) - 1
    t = jnp.arange(tokens.shape[1])
    start = jax.lax.cummax(jnp.where(is_start, t, -1), axis=1)
    return block, t - start - 1


def splice_blocks(base: jax.Array, is_slot: jax.Array, block: jax.Array, offset: jax.Array,
                  rows: jax.Array) -> jax.Array:
    """Writes rows[b, k, j] at the slots (is_slot[b, t]) of block k at offset j (see
    `block_offsets`); elsewhere keeps base. base [B, T, D], rows [B, N, n, D]. A slot token
    outside the first n positions of one of the N blocks (text that happens to hold `[gIMG]` or
    `<image>`, e.g. a sampled one) keeps its token embedding."""
    b, n_blocks, n, width = rows.shape
    inside = (block >= 0) & (block < n_blocks) & (offset >= 0) & (offset < n)
    index = jnp.clip(block, 0, n_blocks - 1) * n + jnp.clip(offset, 0, n - 1)
    gathered = jnp.take_along_axis(rows.reshape(b, n_blocks * n, width), index[..., None], axis=1)
    return jnp.where((is_slot & inside)[..., None], gathered.astype(base.dtype), base)


class Emu(nn.Module):
    vit: EvaVit
    connector: nn.Module  # one of CONNECTORS
    llm: Llama
    image_token_id: int  # <image>
    block_start_id: int  # [IMG]
    frame_token_id: int = -1  # [gIMG] of Emu2's video frames; -1: frames are images (Emu1)

    @property
    def visual_tokens_per_image(self) -> int:
        return self.connector.num_visual_tokens

    @property
    def visual_tokens_per_frame(self) -> int:
        return self.connector.num_frame_tokens if self.frame_token_id >= 0 else self.visual_tokens_per_image

    @property
    def image_size(self) -> int:
        return self.vit.image_size

    @property
    def vocab_size(self) -> int:
        return self.llm.vocab_size

    @property
    def target_width(self) -> int:
        """Width of a regressed visual embedding."""
        return self.connector.target_width

    def _vit(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels [B, N, H, W, 3] -> the ViT's tokens for every slot [B*N, t, D]."""
        return self.vit(pixels.reshape((-1,) + pixels.shape[2:]))

    def image_features(self, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> the ViT's output tokens [B, t, D] (e.g. a feature space for FID)."""
        return self.vit(normalize(images))

    def encode_images(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """uint8 [B, N, H, W, 3] -> (LLM inputs [B, N*n, D_llm], regression targets [B, N*n, D_target])."""
        return self.encode_pixels(normalize(images))

    def encode_pixels(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`encode_images` of pixels already normalised (Emu2-Gen's autoencoding negative is the
        all-zero normalised image, i.e. the dataset-mean image, which no uint8 image equals)."""
        b, n = pixels.shape[:2]
        inputs, targets = self.connector.encode(self._vit(pixels))
        flat = lambda x: x.reshape(b, n * x.shape[1], x.shape[2])  # noqa: E731
        return flat(inputs), flat(targets)

    def embed(self, tokens: jax.Array, images: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Input embeddings with visual inputs spliced in (an image's at its `<image>`s, a video
        frame's at its `[gIMG]`s), and the per-position regression targets (the NEXT position's
        visual target, stop-gradient; images only: frames are never regressed). `images` are
        uint8 [B, N, H, W, 3], normalised here."""
        embeddings = self.llm.embed(tokens)
        target_shape = tokens.shape + (self.connector.target_width,)
        if images is None or images.shape[1] == 0:
            return embeddings, jnp.zeros(target_shape, embeddings.dtype)
        b, n = images.shape[:2]
        per_slot = lambda x: x.reshape((b, n) + x.shape[1:])  # noqa: E731
        vit_tokens = self._vit(normalize(images))
        visual_inputs, visual_targets = self.connector.encode(vit_tokens)
        block, offset = block_offsets(tokens, self.block_start_id)
        is_image = tokens == self.image_token_id
        embeddings = splice_blocks(embeddings, is_image, block, offset, per_slot(visual_inputs))
        targets = splice_blocks(jnp.zeros(target_shape, visual_targets.dtype), is_image, block, offset,
                                per_slot(visual_targets))
        if self.frame_token_id >= 0:
            frames = per_slot(self.connector.encode_frames(vit_tokens))
            embeddings = splice_blocks(embeddings, tokens == self.frame_token_id, block, offset, frames)
        targets = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
        return embeddings, jax.lax.stop_gradient(targets)

    def decode(self, embeddings, positions, segment_ids, cache=None):
        """LLM over input embeddings -> (logits, regressed embeddings, updated cache)."""
        hidden, cache = self.llm(embeddings, positions, segment_ids, cache)
        return self.llm.logits(hidden), self.connector.regress(hidden), cache

    def feed_back(self, regressed: jax.Array) -> jax.Array:
        """A regressed embedding as the next LLM input (Emu1: as is; Emu2: through project_up)."""
        return self.connector.feed_back(regressed)

    # ------------------------------------------------------------ generation hooks (generate/decoding.py)

    def empty_decoding(self, batch: int, length: int) -> tuple[Any, jax.Array]:
        """(an empty KV cache with room for `length` positions, a zero last hidden state [B, 1, D])."""
        return self.llm.init_cache(batch, length), jnp.zeros((batch, 1, self.llm.hidden), jnp.dtype(self.llm.dtype))

    def hidden_states(self, embeddings, positions, segment_ids, cache):
        """Input embeddings through the LLM with its cache -> (final-normed hidden states, cache)."""
        return self.llm(embeddings, positions, segment_ids, cache)

    def next_token_logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def regress(self, hidden: jax.Array) -> jax.Array:
        """Hidden states -> the next visual embedding."""
        return self.connector.regress(hidden)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token ids -> input embeddings (no visual splicing: generated tokens)."""
        return self.llm.embed(tokens)

    def __call__(self, tokens, positions, segment_ids, images=None, cache=None) -> EmuOutput:
        embeddings, targets = self.embed(tokens, images)
        logits, regression, cache = self.decode(embeddings, positions, segment_ids, cache)
        return EmuOutput(logits, regression, targets, cache)


def _fields_of(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def build_model(model_config) -> Emu:
    """The Emu model described by `config.model` (see configs/); the config alone decides it."""
    common = dict(dtype=jnp.dtype(model_config.dtype), param_dtype=jnp.dtype(model_config.param_dtype),
                  attention_impl=model_config.get("attention_impl") or "auto",
                  lora=lora_lib.spec(model_config.get("lora")))
    vit = EvaVit(**model_config.vit.to_dict(), **common, parent=None)
    connector_config = model_config.connector.to_dict()
    connector_cls = CONNECTORS[connector_config.pop("kind")]
    connector = connector_cls(vision_width=vit.width, llm_hidden=model_config.llm.hidden,
                              **_fields_of(connector_cls, {**connector_config, **common}), parent=None)
    llm = Llama(**model_config.llm.to_dict(), **common, parent=None)
    special = model_config.tokens
    frame_token_id = special["gimg"] if tokens_lib.has_video_layout(special) else -1
    return Emu(vit, connector, llm, image_token_id=special["image"], block_start_id=special["img"],
               frame_token_id=frame_token_id)


def example_inputs(model: Emu, batch: int = 1, images_per_row: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of the right shapes (for `jax.eval_shape(model.init, ...)`)."""
    length = max(images_per_row * (model.visual_tokens_per_image + 2) + 2, 8)
    size = model.vit.image_size
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return dict(tokens=ids, positions=ids, segment_ids=ids,
                images=jax.ShapeDtypeStruct((batch, images_per_row, size, size, 3), jnp.uint8))


def matmul_params(tree) -> int:
    """Parameters used in matmuls: 2-D-or-more kernels and embeddings used as heads."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if len(x.shape) >= 2)


def train_flops(abstract_params, model_config, batch: int, seq_len: int, image_slots: int,
                frozen_towers: frozenset = frozenset()) -> float:
    """Model FLOPs of one train step on `batch` rows of `seq_len` tokens with `image_slots` images
    each: 6 per matmul parameter per token (forward + backward) plus attention's 12 * layers *
    width * length per token; the ViT runs on every image slot, forward only (2 per parameter)
    when frozen. (XLA's cost analysis counts a scanned layer once, hence a count from the shapes.)"""
    llm, vit = model_config.llm, model_config.vit
    llm_params = matmul_params({k: v for k, v in abstract_params["llm"].items() if k != "embed_tokens"})
    text = batch * seq_len * (6 * llm_params + 12 * llm.num_layers * llm.hidden * seq_len)
    patches = 1 + (vit.image_size // vit.patch_size) ** 2
    per_param = 2 if "vit" in frozen_towers else 6
    vit_params = matmul_params(abstract_params["vit"])
    images = batch * image_slots * patches * (per_param * vit_params + 2 * per_param * vit.depth * vit.width * patches)
    connector = batch * image_slots * patches * 6 * matmul_params(abstract_params["connector"])
    return float(text + images + connector)


FAMILY = families.Family(build=build_model, example_inputs=example_inputs, train_flops=train_flops,
                         scanned_layers={"vit": "depth", "llm": "num_layers"},
                         layouts=("emu1", "emu1_instruct", "emu2", "emu2_hf", "emu2_gen", "llama_hf", "eva_timm"))

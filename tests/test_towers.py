"""Tower-level checks against independent numpy re-derivations and hand-worked values."""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, init_key, load_config
from scipy.special import erf

from emu_jax.models.causal_former import relative_position_buckets
from emu_jax.models.eva_vit import EvaVit, bicubic_matrix
from emu_jax.summary import count_params


def numpy_eva_block(x, p, post_norm, heads, eps=1e-6):
    """One EVA-CLIP block in float64 numpy, written from the architecture description."""
    def ln(h, q):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + eps) * q["scale"] + q["bias"]

    def attention(h):
        a = p["attn"]
        qkv = np.einsum("tw,wkhd->tkhd", h, a["qkv"]["kernel"])
        q, k, v = qkv[:, 0] + a["q_bias"], qkv[:, 1], qkv[:, 2] + a["v_bias"]
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("hts,shd->thd", weights, v)
        return np.einsum("thd,hdw->tw", out, a["proj"]["kernel"]) + a["proj"]["bias"]

    def mlp(h):
        m = p["mlp"]
        h = h @ m["fc1"]["kernel"] + m["fc1"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        return h @ m["fc2"]["kernel"] + m["fc2"]["bias"]

    if post_norm:
        x = x + ln(attention(x), p["norm1"])
        return x + ln(mlp(x), p["norm2"])
    x = x + attention(ln(x, p["norm1"]))
    return x + mlp(ln(x, p["norm2"]))


@pytest.mark.parametrize("post_norm", [False, True], ids=["eva01_pre_norm", "eva02_post_norm"])
def test_eva_vit_matches_numpy_reference(post_norm):
    vit = EvaVit(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_hidden=64, post_norm=post_norm)
    images = np.random.RandomState(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    params = nn.unbox(jax.jit(vit.init)(init_key(1), images)["params"])
    # randomise biases and norms so that a swapped or missing one shows
    rng = np.random.RandomState(2)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) + 0.1 * rng.normal(size=a.shape), params)
    out = jax.jit(vit.apply)({"params": jax.tree.map(np.float32, params)}, images)

    for n in range(2):
        x = images[n].astype(np.float64)
        patches = x.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 8 * 8 * 3)
        kernel = params["patch_embed"]["proj"]["kernel"].reshape(8 * 8 * 3, 32)
        tokens = patches @ kernel + params["patch_embed"]["proj"]["bias"]
        tokens = np.concatenate([params["cls_token"][0], tokens]) + params["pos_embed"][0]
        for i in range(2):
            tokens = numpy_eva_block(tokens, params[f"blocks_{i}"], post_norm, heads=4)
        np.testing.assert_allclose(out[n], tokens, atol=2e-4, rtol=1e-4)


def test_bicubic_weights_match_hand_worked_pytorch_values():
    # align_corners=False, a=-0.75, 2 -> 4: source x = -0.25, 0.25, 0.75, 1.25, border taps clamped
    expected = np.array([[1.10546875, -0.10546875], [0.7734375, 0.2265625],
                         [0.2265625, 0.7734375], [-0.10546875, 1.10546875]])
    np.testing.assert_allclose(bicubic_matrix(2, 4), expected, atol=1e-7)
    np.testing.assert_allclose(bicubic_matrix(5, 5), np.eye(5), atol=1e-7)
    np.testing.assert_allclose(bicubic_matrix(7, 3).sum(1), 1.0, atol=1e-6)


def loop_bicubic_2d(grid, out_size, a=-0.75):
    """PyTorch's bicubic upsampling written pixel by pixel (16 clamped taps per output)."""
    def cubic(t):
        t = abs(t)
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else (
            ((a * t - 5 * a) * t + 8 * a) * t - 4 * a if t < 2 else 0.0)
    n = grid.shape[0]
    out = np.zeros((out_size, out_size, grid.shape[2]))
    for oy in range(out_size):
        for ox in range(out_size):
            sy, sx = (oy + 0.5) * n / out_size - 0.5, (ox + 0.5) * n / out_size - 0.5
            by, bx = int(np.floor(sy)), int(np.floor(sx))
            for ty in range(-1, 3):
                for tx in range(-1, 3):
                    w = cubic(ty - (sy - by)) * cubic(tx - (sx - bx))
                    out[oy, ox] += w * grid[min(max(by + ty, 0), n - 1), min(max(bx + tx, 0), n - 1)]
    return out


def test_position_embedding_is_interpolated_for_a_larger_image():
    """A ViT whose checkpoint grid is 4x4 run on 64 px images (8x8 patches) equals a ViT of grid
    8x8 whose position embedding was resized by PyTorch's bicubic rule."""
    kw = dict(patch_size=8, width=16, depth=1, num_heads=2, mlp_hidden=32)
    small_grid = EvaVit(image_size=64, pos_embed_grid=4, **kw)
    full_grid = EvaVit(image_size=64, **kw)
    images = np.random.RandomState(3).normal(size=(1, 64, 64, 3)).astype(np.float32)
    params = nn.unbox(jax.jit(small_grid.init)(init_key(0), images)["params"])
    assert params["pos_embed"].shape == (1, 17, 16)
    pos = np.asarray(params["pos_embed"][0], np.float64)
    resized = loop_bicubic_2d(pos[1:].reshape(4, 4, 16), 8).reshape(64, 16)
    full_params = dict(params, pos_embed=jnp.asarray(np.concatenate([pos[:1], resized])[None], jnp.float32))
    np.testing.assert_allclose(jax.jit(small_grid.apply)({"params": params}, images),
                               jax.jit(full_grid.apply)({"params": full_params}, images), atol=1e-5)


def test_t5_relative_position_buckets_match_hand_worked_values():
    buckets = relative_position_buckets(300, num_buckets=32, max_distance=128)
    # 16 exact buckets, then 16 + floor(ln(d / 16) / ln(8) * 16), capped at 31
    distance_to_bucket = {0: 0, 1: 1, 15: 15, 16: 16, 20: 17, 40: 23, 100: 30, 127: 31, 128: 31, 299: 31}
    for d, b in distance_to_bucket.items():
        assert buckets[d, 0] == b, (d, buckets[d, 0], b)
    assert (buckets[0, 1:] == 0).all()  # keys after the query all share bucket 0 (they are masked anyway)


def eva_count(w, depth, mlp, patch, grid):
    block = 4 * w * w + 2 * w * mlp + 8 * w + mlp
    return depth * block + patch * patch * 3 * w + w + w + (1 + grid * grid) * w


def llama_count(vocab, h, layers, ffn):
    return 2 * vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h


def test_released_parameter_counts_are_pinned():
    emu1 = count_params(load_config("emu1_14b").model)
    emu2 = count_params(load_config("emu2_37b").model)
    total = lambda counts, tower: sum(counts[tower].values())  # noqa: E731

    assert total(emu1, "vit") == eva_count(1408, 40, 6144, 14, 16) == 1_011_143_296
    assert total(emu1, "llm") == llama_count(32004, 5120, 40, 13824)
    assert llama_count(32000, 5120, 40, 13824) == 13_015_864_320  # the public LLaMA-13B figure
    t5_block = 4 * 768 ** 2 + 2 * 768 ** 2 + 2 * 1408 * 768 + 2 * 768 * 3072 + 3 * 768
    cformer = 2 * 1408 + 32 * 768 + 12 * t5_block + 32 * 12 + 768 + 768 * 5120 + 5120 + 5120 * 5120
    assert total(emu1, "connector") == cformer

    assert total(emu2, "vit") == eva_count(1792, 64, 15360, 14, 32) == 4_350_093_568
    assert total(emu2, "llm") == llama_count(32272, 6656, 60, 17920)
    assert total(emu2, "connector") == 2 * 1792 * 6656

    # the released towers' sizes: EVA-g ~1.0B, EVA-E+ ~4.4B, LLaMA-13B ~13.0B, LLaMA-33B ~32.5B
    for counts, tower, billions in [(emu1, "vit", 1.0), (emu2, "vit", 4.4), (emu1, "llm", 13.0), (emu2, "llm", 32.5)]:
        assert abs(total(counts, tower) / 1e9 - billions) / billions < 0.02


def test_summary_cli_ends_with_the_exact_total():
    out = subprocess.run([sys.executable, "-m", "emu_jax.summary", f"--config={ROOT}/configs/emu2_chat.py"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()
    counts = count_params(load_config("emu2_chat").model)
    assert out[-1] == f"total: {sum(sum(c.values()) for c in counts.values())}"
    assert "connector: 23,855,104" in out  # 16x16 pooling changes no weights: project_up + project_down

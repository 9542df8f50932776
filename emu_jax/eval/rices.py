"""Choosing few-shot demonstrations: RICES (retrieval-based in-context example selection: the
train examples whose visual-encoder features are nearest the query's by cosine similarity, most
similar last, i.e. closest to the query) or seeded random picks. Features are computed once per
(checkpoint, split) and cached as .npz next to the sweep's results.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np


def cosine_top_k(queries: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] indices of the k keys most similar to each query, most similar first (ties: lower
    index first)."""
    if k > len(keys):
        raise ValueError(f"asked for {k} demonstrations but the pool has {len(keys)}")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    similarity = unit(np.asarray(queries, np.float64)) @ unit(np.asarray(keys, np.float64)).T
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), similarity.shape), -similarity), axis=-1)
    return order[:, :k]


STRATEGIES = ("rices", "random")


def demonstrations(strategy: str, k: int, query_features: np.ndarray, pool_features: np.ndarray,
                   seed: int = 0) -> np.ndarray:
    """[Q, k] pool indices per query, in prompt order (for RICES the nearest comes last, right
    before the query)."""
    if k == 0:
        return np.zeros((len(query_features), 0), np.int64)
    if strategy == "rices":
        return cosine_top_k(query_features, pool_features, k)[:, ::-1]
    if strategy == "random":
        rng = np.random.RandomState(seed)
        return np.stack([rng.choice(len(pool_features), k, replace=False) for _ in range(len(query_features))])
    raise ValueError(f"demonstration strategy {strategy!r}: expected one of {STRATEGIES}")


def cached_features(path: str, images: Callable[[], np.ndarray], features: Callable[[np.ndarray], np.ndarray],
                    count: int, batch_size: int = 64, agree: Callable[[bool], bool] = bool) -> np.ndarray:
    """Features of the `count` images `images()` returns (uint8 [N, S, S, 3]), read from `path`
    (.npz) when computed before for as many images; written atomically. `agree` turns "this
    process has a valid cache" into the decision every process takes (`features` may be a
    computation all processes must run together)."""
    cached = np.load(path)["features"] if os.path.exists(path) else None
    if agree(cached is not None and len(cached) == count):
        return cached
    pixels = images()
    out = np.concatenate([features(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, features=out)
    os.replace(path + ".tmp", path)
    return out

"""Fréchet distance between the feature distributions of generated and real images (FID when the
features are Inception's pool3):

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

computed in float64 with scipy's matrix square root; a near-singular product (few samples) is
regularised with eps * I, as the reference implementations do. Feature networks are pluggable:
`torchscript_features(path)` runs a TorchScript Inception the user supplies (e.g. the common
`inception-2015-12-05.pt`, called as `model(uint8 NCHW, return_features=True)` -> [N, 2048]);
`encoder_features(...)` (the offline default) mean-pools our own visual encoder.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N, S, S, 3] -> float [N, D]


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature vectors [N, D] for a covariance, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    root = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(root.imag).max():.3g})")
        root = root.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def fid(generated: np.ndarray, real: np.ndarray, features: FeatureFn, batch_size: int = 64) -> float:
    def all_features(images):
        return np.concatenate([features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return frechet_distance(*statistics(all_features(generated)), *statistics(all_features(real)))


def torchscript_features(path: str, device: str = "cpu") -> FeatureFn:
    """A TorchScript Inception from `path` (the user's file; nothing is downloaded)."""
    import torch
    model = torch.jit.load(path, map_location=device).eval()

    def run(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        with torch.no_grad():
            return model(batch, return_features=True).cpu().numpy().astype(np.float64)
    return run


def encoder_features(model, params) -> FeatureFn:
    """Mean-pooled output tokens of the Emu model's visual encoder on uint8 images, jitted."""
    import jax

    from emu_jax.parallel import mesh as mesh_lib

    @jax.jit
    def encode(params, images):
        return model.apply({"params": params}, images, method="image_features").mean(axis=1)

    def run(images: np.ndarray) -> np.ndarray:
        return mesh_lib.to_host(encode(params, images)).astype(np.float64)
    return run

"""Image grids for sample logging: rows of equally sized uint8 images -> one PNG."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """rows: each [N, S, S, 3] uint8 (same N and S) -> [rows * (S + pad) + pad, ...] on white."""
    n, s = rows[0].shape[:2]
    out = np.full((len(rows) * (s + pad) + pad, n * (s + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (s + pad), pad + c * (s + pad)
            out[top:top + s, left:left + s] = image
    return out


def save_png(pixels: np.ndarray, path: str) -> None:
    """Written to a temporary name first, so a killed run never leaves a truncated PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)

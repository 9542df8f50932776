"""Training-time image augmentation: a fresh random view of a document's images each time it is read.

A vision tower trained from scratch on a small image set sees the same few thousand images many
times; with fixed views it memorises them, and how well it generalises then depends on the run's
trajectory (the digits world's held-out caption accuracy ranged 0.65 - 0.97 over dependency
sets with the same seed). Drawing a new view per read removes that. The released Emu models were
pretrained without augmentation (`kind="none"`, the default).

Grain's `random_map` seeds each record's generator from the pipeline seed and the record's
position in the mixture (before the split over processes), so an augmented stream is reproducible,
the same over any number of processes, and a resumed run sees the views it would have.
One draw per document: a video's frames (and a document's image sequence) move together.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


def border_colour(pixels: np.ndarray) -> tuple[int, ...]:
    """The median colour of an image's outermost pixels (its background where it has one): what
    the area uncovered by a shift shows."""
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(c) for c in np.median(edge, 0).round())


def affine_matrix(size: int, scale: float, degrees: float, shift: tuple[float, float]) -> tuple[float, ...]:
    """PIL's inverse affine map (output point -> input point, pixel i spanning [i, i + 1)) for a
    scale and rotation about the image centre followed by a shift of `shift` pixels (x, y)."""
    c = size / 2
    cos, sin = math.cos(math.radians(degrees)) / scale, math.sin(math.radians(degrees)) / scale
    ox, oy = c + shift[0], c + shift[1]
    return (cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)


@dataclasses.dataclass(frozen=True)
class RandomAffine:
    """Scale in [min_scale, max_scale], rotation within +-max_rotation degrees, shift within
    +-max_shift of the image size; bicubic, the uncovered area filled with the border colour."""
    min_scale: float = 0.85
    max_scale: float = 1.1
    max_rotation: float = 12.0
    max_shift: float = 0.1

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not len(images):
            return images
        size = images.shape[1]
        scale = rng.uniform(self.min_scale, self.max_scale)
        degrees = rng.uniform(-self.max_rotation, self.max_rotation)
        shift = tuple(rng.uniform(-self.max_shift, self.max_shift, size=2) * size)
        matrix = affine_matrix(size, scale, degrees, shift)
        return np.stack([np.asarray(Image.fromarray(image).transform(
            (size, size), Image.AFFINE, matrix, Image.BICUBIC, fillcolor=border_colour(image)))
            for image in images])


AUGMENTATIONS = {"affine": RandomAffine}


@dataclasses.dataclass(frozen=True)
class AugmentImages:
    """Grain random map: applies `augmentation` to an example's `images`, a document's [n, S, S, 3]
    or the one image [S, S, 3] of an image batch's example (the visual decoder's stages)."""
    augmentation: RandomAffine

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        images = example["images"]
        if images.ndim == 3:
            return example | {"images": self.augmentation(images[None], rng)[0]}
        return example | {"images": self.augmentation(images, rng)}


def from_config(augment_config) -> AugmentImages | None:
    """`data.augment` ({kind, <kind>: {options}}) -> the random map, or None for kind "none"."""
    kind = augment_config.kind
    if kind == "none":
        return None
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown data.augment.kind {kind!r}; choose one of none, {', '.join(AUGMENTATIONS)}")
    return AugmentImages(AUGMENTATIONS[kind](**augment_config[kind]))

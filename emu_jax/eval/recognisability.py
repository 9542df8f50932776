"""Is a generated digit recognisable? An independent classifier decides.

The classifier is scikit-learn's RBF support-vector machine fit on the real 8x8 digits of the
digits world's train split (rendered at 32 px as the dataset does, then area-averaged back to 8x8
and scaled to sklearn's 0..16 ink range); it never sees anything our models made. An image counts
as recognisable when the classifier labels it with its source digit.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image


def ink_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] dark-on-white -> [N, 64] ink in 0..16 on an 8x8 grid."""
    out = []
    for pixels in images:
        gray = Image.fromarray(pixels).convert("L").resize((8, 8), Image.BOX)
        out.append((255.0 - np.asarray(gray, np.float64)).reshape(-1) * 16.0 / 255.0)
    return np.stack(out)


@functools.cache
def classifier():
    """(fitted SVC, its accuracy on the held-out real digits)."""
    from sklearn.svm import SVC
    from emu_jax.data import digits
    images, labels = digits.load_digits()
    train, test = digits.split_indices(len(images), "train"), digits.split_indices(len(images), "test")
    model = SVC(gamma="scale", C=10.0).fit(ink_features(images[train]), labels[train])
    return model, float((model.predict(ink_features(images[test])) == labels[test]).mean())


def digit_accuracy(images: np.ndarray, digits_: list[int]) -> float:
    model, _ = classifier()
    return float((model.predict(ink_features(np.asarray(images))) == np.asarray(digits_)).mean())


def ink_centre(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the ink's centre of mass: darkness below the image's median grey (its
    background, which a decoder may not draw pure white), or None for an image without ink."""
    gray = np.asarray(Image.fromarray(image).convert("L"), np.float64)
    ink = np.maximum(np.median(gray) - gray, 0.0)
    if ink.sum() == 0:
        return None
    ys, xs = np.indices(ink.shape) + 0.5
    return float((ink * xs).sum() / ink.sum()), float((ink * ys).sum() / ink.sum())


def placement(images: np.ndarray, boxes: list, digits_: list[int], canvas: int) -> dict:
    """Is each image's digit where its box says? `boxes` (x1, y1, x2, y2) are in pixels of a `canvas`
    side, scaled to the images' own. `crop_accuracy`: the share whose crop at the box the classifier
    labels as the digit; `in_box`: the share whose ink centre lies inside the box."""
    crops, inside = [], []
    for image, box in zip(np.asarray(images), boxes):
        x1, y1, x2, y2 = (v * image.shape[1] / canvas for v in box)
        crops.append(np.asarray(Image.fromarray(image).crop((x1, y1, x2, y2)).resize((32, 32), Image.BICUBIC)))
        centre = ink_centre(image)
        inside.append(centre is not None and x1 <= centre[0] <= x2 and y1 <= centre[1] <= y2)
    return {"crop_accuracy": digit_accuracy(np.stack(crops), digits_), "in_box": float(np.mean(inside))}

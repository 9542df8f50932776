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

"""The digits world: the embedded default dataset, built from sklearn's 1,797 real handwritten digits.

Document kinds (every image is a real 8x8 digit, upscaled):
  caption     [image] "a handwritten seven"
  text2image  "a handwritten seven" [image]            (text-to-image, learned through regression)
  vqa         [image] "question: what digit is this? answer: seven"
  fewshot     [image] "this is a dax." [image] "this is a wug." ... — with real names, or with a
              per-document arbitrary labelling, so the last label can only come from the context
  video       8 frames of a digit moving across the frame, "a handwritten four moving left"

Images with index % 5 == 0 are held out (split "test"); the rest make "train", where caption and
vqa documents also come in AUGMENTED_VIEWS extra views of each digit (small random shift, scale and
rotation; a from-scratch ViT needs them to generalise from 1,437 images). One command builds
the TFDS dataset (array_record) and a sentencepiece model trained on its text:

    python -m emu_jax.data.digits --data_dir=~/.cache/emu_jax/datasets
"""
from __future__ import annotations

import fcntl
import functools
import io
import os
import re

import numpy as np
import sentencepiece as spm
from absl import app, flags
from PIL import Image

from emu_jax.data import records
from emu_jax.data.media import encode_png

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NONCE_WORDS = ("dax", "wug", "blicket", "toma", "fep", "zib", "kiki", "bouba", "lorp", "mib")
DIRECTIONS = ("left", "right", "up", "down")
IMAGE_SIZE = 32
VERSION = "1.1.0"
VQA_QUESTION = "question: what digit is this? answer:"
AUGMENTED_VIEWS = 3


def caption_text(digit: int) -> str:
    return f"a handwritten {NAMES[digit]}"


def fewshot_text(label: str) -> str:
    return f"this is a {label}."


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB images [1797, 32, 32, 3], dark ink on white; labels [1797])."""
    from sklearn.datasets import load_digits as sklearn_digits
    digits = sklearn_digits()
    images = []
    for ink in digits.images:
        small = Image.fromarray((255 - ink * (255 / 16)).round().astype(np.uint8))
        images.append(np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC).convert("RGB")))
    return np.stack(images), digits.target.astype(np.int64)


def split_indices(count: int, split: str) -> np.ndarray:
    held_out = np.arange(count) % 5 == 0
    return np.flatnonzero(held_out if split == "test" else ~held_out)


def augmented(pixels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """The digit shifted by up to 3 px, scaled by 0.85-1.1 and rotated by up to 12 degrees."""
    img = Image.fromarray(pixels)
    scale = rng.uniform(0.85, 1.1)
    size = max(8, int(round(IMAGE_SIZE * scale)))
    img = img.resize((size, size), Image.BICUBIC).rotate(rng.uniform(-12, 12), Image.BICUBIC,
                                                           fillcolor=(255, 255, 255))
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    dx, dy = rng.randint(-3, 4, size=2)
    canvas.paste(img, ((IMAGE_SIZE - size) // 2 + dx, (IMAGE_SIZE - size) // 2 + dy))
    return np.asarray(canvas)


CANVAS_SIZE = 64  # the grounding canvases: a digit somewhere in a larger image


def boxed(pixels: np.ndarray, rng: np.random.RandomState, canvas: int = CANVAS_SIZE):
    """(uint8 [canvas, canvas, 3], box (x1, y1, x2, y2) in its pixels, x2 and y2 exclusive): the
    digit scaled into a random square box, a third to two thirds of the side, on a white canvas."""
    side = rng.randint(canvas // 3, 2 * canvas // 3 + 1)
    x1, y1 = (int(v) for v in rng.randint(0, canvas - side + 1, size=2))
    box = (x1, y1, x1 + side, y1 + side)
    return placed(pixels, box, canvas), box


def placed(pixels: np.ndarray, box: tuple[int, int, int, int], canvas: int = CANVAS_SIZE) -> np.ndarray:
    """uint8 [canvas, canvas, 3]: the digit scaled into the square `box` of a white canvas."""
    x1, y1, x2, y2 = box
    out = np.full((canvas, canvas, 3), 255, np.uint8)
    out[y1:y2, x1:x2] = np.asarray(Image.fromarray(pixels).resize((x2 - x1, y2 - y1), Image.BICUBIC))
    return out


# The generation canvases: the digit in one quadrant (0 top left, 1 top right, 2 bottom left, 3
# bottom right), in a square box of 3/8 to 1/2 of the side jittered inside it. The 2x2-pooled tiny
# encoder gives one embedding per quadrant; a digit drawn at the canvas centre lies in no box.
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def quadrant_box(quadrant: int, rng: np.random.RandomState, canvas: int = CANVAS_SIZE) -> tuple[int, int, int, int]:
    half = canvas // 2
    side = rng.randint(3 * canvas // 8, half + 1)
    x1, y1 = (int(v) for v in rng.randint(0, half - side + 1, size=2))
    x1, y1 = x1 + half * (quadrant % 2), y1 + half * (quadrant // 2)
    return x1, y1, x1 + side, y1 + side


def moved_quadrant(quadrant: int, direction: str) -> int | None:
    """The quadrant one step `direction` of `quadrant`, or None off the canvas."""
    dx, dy = MOVES[direction]
    column, row = quadrant % 2 + dx, quadrant // 2 + dy
    return row * 2 + column if 0 <= column < 2 and 0 <= row < 2 else None


def moved_text(direction: str) -> str:
    return f"the same digit moved {direction}"  # no comma: the world's tokenizer has none


GRID = 9  # box corners in words: the canvas side split in 9 steps (the world's tokenizer has no numerals)


def box_words(box: tuple[int, int, int, int], canvas: int = CANVAS_SIZE) -> str:
    """A canvas box in the world's words, corners rounded to the grid: "two three six seven." (Emu2-Chat's
    `[x1, y1, x2, y2]`, whose numerals and brackets this vocabulary does not have)."""
    return " ".join(NAMES[round(v * GRID / canvas)] for v in box) + "."


def words_box(text: str, canvas: int = CANVAS_SIZE) -> tuple[float, float, float, float] | None:
    """`box_words`' inverse: the first four digit names of `text` as a box in canvas pixels, or None."""
    found = [NAMES.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in NAMES[:GRID + 1]][:4]
    return tuple(g * canvas / GRID for g in found) if len(found) == 4 else None


def moving_frames(pixels: np.ndarray, direction: str, count: int = 8) -> list[bytes]:
    """The digit at half size sliding across a white frame, as encoded PNG frames."""
    half = np.asarray(Image.fromarray(pixels).resize((IMAGE_SIZE // 2, IMAGE_SIZE // 2), Image.BICUBIC))
    travel = IMAGE_SIZE - half.shape[0]
    frames = []
    for step in np.linspace(0, travel, count).round().astype(int):
        offset = {"right": (travel // 2, step), "left": (travel // 2, travel - step),
                  "down": (step, travel // 2), "up": (travel - step, travel // 2)}[direction]
        canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
        canvas[offset[0]:offset[0] + half.shape[0], offset[1]:offset[1] + half.shape[1]] = half
        frames.append(encode_png(canvas))
    return frames


def documents(split: str, seed: int = 0):
    """Yields (key, document) for one split, deterministically."""
    images, labels = load_digits()
    idx = split_indices(len(images), split)
    rng = np.random.RandomState(seed + (split == "test"))
    png = {i: encode_png(images[i]) for i in idx}
    views = AUGMENTED_VIEWS if split == "train" else 0
    for i in idx:
        d = int(labels[i])
        meta = dict(index=int(i), digit=d)
        yield f"text2image-{i}", records.document([records.text(caption_text(d)), records.image(png[i])],
                                                  "digits", task="text2image", **meta)
        for view in range(1 + views):
            image = png[i] if view == 0 else encode_png(augmented(images[i], rng))
            yield f"caption-{i}-{view}", records.document([records.image(image), records.text(caption_text(d))],
                                                          "digits", task="caption", view=view, **meta)
            yield f"vqa-{i}-{view}", records.document(
                [records.image(image), records.text(f"{VQA_QUESTION} {NAMES[d]}")], "digits", task="vqa",
                view=view, **meta)
    by_digit = {d: idx[labels[idx] == d] for d in range(10)}
    for n in range(len(idx)):
        classes = rng.choice(10, size=2, replace=False)
        nonce = n % 2 == 0
        words = rng.choice(NONCE_WORDS, size=2, replace=False) if nonce else [NAMES[c] for c in classes]
        shots = rng.randint(3, 7)
        segments, picks = [], []
        for _ in range(shots):
            c = rng.randint(2)
            pick = int(rng.choice(by_digit[classes[c]]))
            picks.append(pick)
            segments += [records.image(png[pick]), records.text(fewshot_text(words[c]))]
        yield f"fewshot-{n}", records.document(segments, "digits", task="fewshot", nonce=bool(nonce), indices=picks)
    for n in range(len(idx) // 3):
        i = int(rng.choice(idx))
        direction = DIRECTIONS[rng.randint(len(DIRECTIONS))]
        yield f"video-{n}", records.document(
            [records.frames(moving_frames(images[i], direction)),
             records.text(f"{caption_text(int(labels[i]))} moving {direction}")],
            "digits", task="video", index=i, digit=int(labels[i]), direction=direction)


def corpus(split: str = "train") -> list[str]:
    return [s["text"] for _, doc in documents(split) for s in doc["segments"] if "text" in s]


@functools.cache  # TFDS registers a builder class by name when it is defined
def _builder_class():
    import tensorflow_datasets as tfds

    class DigitsWorld(tfds.core.GeneratorBasedBuilder):
        """sklearn's handwritten digits as interleaved image-text-video documents."""
        VERSION = tfds.core.Version(VERSION)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=__doc__, features=tfds.features.FeaturesDict({
                "document": tfds.features.Tensor(shape=(), dtype=np.object_), "task": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            for key, doc in documents(split):
                yield key, {"document": records.encode(doc), "task": doc["meta"]["task"]}

    return DigitsWorld


def train_sentencepiece(sentences, path: str, vocab_size: int) -> str:
    """Trains a BPE model with LLaMA's id conventions (unk 0, bos 1, eos 2) on `sentences`;
    the vocabulary may come out smaller than `vocab_size` on a small corpus."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def build(data_dir: str, vocab_size: int = 512) -> str:
    """Builds (once) the TFDS dataset and its tokenizer; returns the dataset directory, which
    holds the array_record shards and `tokenizer.model`."""
    data_dir = os.path.expanduser(data_dir)
    dataset_dir = os.path.join(data_dir, "digits_world", VERSION)
    tokenizer_path = os.path.join(dataset_dir, "tokenizer.model")
    os.makedirs(data_dir, exist_ok=True)
    # Every process of a multi-process run on one host builds into the same directory: an exclusive
    # lock (released by the kernel if its holder dies) lets the first build and the rest find it done.
    with open(os.path.join(data_dir, ".digits_world.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
            _builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
        if not os.path.exists(tokenizer_path):
            train_sentencepiece(corpus("train"), tokenizer_path + ".tmp", vocab_size)
            os.replace(tokenizer_path + ".tmp", tokenizer_path)
    return dataset_dir


def main(argv):
    del argv
    import tensorflow_datasets as tfds
    dataset_dir = build(flags.FLAGS.data_dir)
    builder = tfds.builder_from_directory(dataset_dir)
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} documents")
    print(f"dataset: {dataset_dir}")


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", "~/.cache/emu_jax/datasets", "Where TFDS datasets live.")
    app.run(main)

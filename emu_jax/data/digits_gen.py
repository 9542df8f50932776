"""Digits-world generation tuning data in `data.write generation`'s JSONL (configs/tiny_gen.py).

Every target is a 64 px canvas with a digit in one quadrant (`digits.quadrant_box`). Two kinds, as
Emu2-Gen's recipe has them:
  grounded  "a handwritten seven" + the box as Emu2-Gen's box image    -> the canvas
  subject   a canvas with a digit + "the same digit moved left"        -> that digit, half a canvas left
Per train digit one of each for the original image and one of each for a random view
(`digits.augmented`); per held-out digit one of each. Also `<split>-canvases.jsonl`: every target
canvas with its caption, in `data.write pairs`' JSONL, to retrain the tiny visual decoder (which
draws centred 32 px digits) on canvases. Writes `<out>/<split>*.jsonl` and the PNGs under
`<out>/images/`, which `python -m emu_jax.data.write generation` and `pairs` turn into shards as
they would a user's own files (the commands: configs/tiny_gen.py):

    python -m emu_jax.data.digits_gen --out=/tmp/digits_gen
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import app, flags

from emu_jax.data import digits
from emu_jax.data.media import BOX_CANVAS, encode_png


@dataclasses.dataclass
class Example:
    key: str
    kind: str  # "grounded" or "subject"
    digit: int
    prompt: list  # text, ("box", box in canvas pixels) or ("image", uint8 canvas)
    target: np.ndarray  # uint8 [CANVAS_SIZE, CANVAS_SIZE, 3]
    box: tuple[int, int, int, int]  # where the target's digit is, in canvas pixels


def grounded(key: str, pixels: np.ndarray, digit: int, rng: np.random.RandomState) -> Example:
    box = digits.quadrant_box(rng.randint(4), rng)
    return Example(key, "grounded", digit, [digits.caption_text(digit), ("box", box)], digits.placed(pixels, box), box)


def subject(key: str, pixels: np.ndarray, digit: int, rng: np.random.RandomState) -> Example:
    direction = digits.DIRECTIONS[rng.randint(len(digits.DIRECTIONS))]
    source = int(rng.choice([q for q in range(4) if digits.moved_quadrant(q, direction) is not None]))
    x1, y1, x2, y2 = digits.quadrant_box(source, rng)
    dx, dy = (v * digits.CANVAS_SIZE // 2 for v in digits.MOVES[direction])
    box = (x1 + dx, y1 + dy, x2 + dx, y2 + dy)
    return Example(key, "subject", digit, [("image", digits.placed(pixels, (x1, y1, x2, y2))),
                                           digits.moved_text(direction)], digits.placed(pixels, box), box)


def examples(split: str, seed: int = 0, limit: int | None = None) -> list[Example]:
    """The split's examples, deterministically (held-out digits: the first `limit` of the test split)."""
    images, labels = digits.load_digits()
    rng = np.random.RandomState(seed + 7 * (split == "test"))
    out = []
    for i in digits.split_indices(len(images), split)[:limit]:
        for view in range(2 if split == "train" else 1):
            pixels = images[i] if view == 0 else digits.augmented(images[i], rng)
            out += [make(f"{kind}-{i}-{view}", pixels, int(labels[i]), rng)
                    for kind, make in (("grounded", grounded), ("subject", subject))]
    return out


def box_entry(box) -> dict:
    """A canvas box as a prompt's {"box": ...} in Emu2-Gen's box-image pixels."""
    return {"box": [v * BOX_CANVAS // digits.CANVAS_SIZE for v in box]}


def _png(out: str, name: str, pixels: np.ndarray) -> str:
    with open(os.path.join(out, name), "wb") as f:
        f.write(encode_png(pixels))
    return name


def _write_jsonl(path: str, entries: list[dict]) -> str:
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    os.replace(path + ".tmp", path)
    return path


def write(out: str, split: str, seed: int = 0) -> list[str]:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    prompts, canvases = [], []
    for example in examples(split, seed):
        items = []
        for n, item in enumerate(example.prompt):
            if isinstance(item, str):
                items.append(item)
            elif item[0] == "box":
                items.append(box_entry(item[1]))
            else:
                items.append({"image": _png(out, f"images/{split}-{example.key}-prompt{n}.png", item[1])})
        target = _png(out, f"images/{split}-{example.key}.png", example.target)
        prompts.append({"prompt": items, "image": target})
        canvases.append({"image": target, "caption": digits.caption_text(example.digit)})
    return [_write_jsonl(os.path.join(out, f"{split}.jsonl"), prompts),
            _write_jsonl(os.path.join(out, f"{split}-canvases.jsonl"), canvases)]


def main(argv):
    del argv
    for split in ("train", "test"):
        print(*write(os.path.expanduser(flags.FLAGS.out), split), sep="\n")


if __name__ == "__main__":
    flags.DEFINE_string("out", "/tmp/digits_gen", "Where the JSONL files and images go.")
    app.run(main)

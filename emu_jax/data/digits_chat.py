"""Digits-world conversations in LLaVA's file format, for the chat-tuning recipe (configs/tiny_chat.py).

Per digit image (train: the original and AUGMENTED_VIEWS random views; test: the original), two
turns: "what digit is this?" -> "it is a <name>.", then "is it even?" -> "yes." / "no."; and per
digit one grounding conversation (Emu2-Chat's grounding mode): the digit in a random box of a 64 px
canvas, "where is the digit?" -> its box in the world's words (`digits.box_words`: the digits
tokenizer has no numerals for Emu2-Chat's `[x1, y1, x2, y2]`). Writes
`<out>/<split>.json` and the PNGs under `<out>/images/`, which `python -m emu_jax.data.write
conversations` turns into shards, as it would a user's own LLaVA file:

    python -m emu_jax.data.digits_chat --out=/tmp/digits_chat
    python -m emu_jax.data.write conversations --input=/tmp/digits_chat/train.json --output=/tmp/digits_chat/train
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from emu_jax.data import digits
from emu_jax.data.media import encode_png

QUESTION = "what digit is this?"
WHERE = "where is the digit?"


def answer(digit: int) -> str:
    return f"it is a {digits.NAMES[digit]}."


def write(out: str, split: str, seed: int = 0) -> str:
    images, labels = digits.load_digits()
    rng = np.random.RandomState(seed + (split == "test"))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    entries = []
    for i in digits.split_indices(len(images), split):
        for view in range(1 + (digits.AUGMENTED_VIEWS if split == "train" else 0)):
            pixels = images[i] if view == 0 else digits.augmented(images[i], rng)
            name = f"images/{split}-{i}-{view}.png"
            with open(os.path.join(out, name), "wb") as f:
                f.write(encode_png(pixels))
            d = int(labels[i])
            entries.append({"id": f"{split}-{i}-{view}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": answer(d)},
                {"from": "human", "value": "is it even?"}, {"from": "gpt", "value": "yes." if d % 2 == 0 else "no."}]})
        canvas, box = digits.boxed(images[i], rng)
        name = f"images/{split}-{i}-box.png"
        with open(os.path.join(out, name), "wb") as f:
            f.write(encode_png(canvas))
        entries.append({"id": f"{split}-{i}-box", "image": name, "grounding": True, "conversations": [
            {"from": "human", "value": f"<image>{WHERE}"}, {"from": "gpt", "value": digits.box_words(box)}]})
    path = os.path.join(out, f"{split}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f)
    os.replace(path + ".tmp", path)
    return path


def main(argv):
    del argv
    for split in ("train", "test"):
        print(write(os.path.expanduser(flags.FLAGS.out), split))


if __name__ == "__main__":
    flags.DEFINE_string("out", "/tmp/digits_chat", "Where the JSON files and images go.")
    app.run(main)

"""Greedy captions of held-out images, and the digits world's caption accuracy.

A caption prompt is `<s> [IMG] <image> x n [/IMG]`, as the caption documents begin; the model
continues with the caption. On the digits world a caption counts as right when it names the
image's digit and no other digit.
"""
from __future__ import annotations

import hashlib
import re

import jax
import numpy as np

from emu_jax import tokens as tokens_lib
from emu_jax.data import media, pipeline, records
from emu_jax.data.digits import NAMES
from emu_jax.data.tokenizer import Tokenizer
from emu_jax.generate import decoding
from emu_jax.parallel import mesh as mesh_lib


def held_out_images(data_config, image_size: int, count: int, require_meta: str = "") -> list[tuple[np.ndarray, dict]]:
    """Up to `count` distinct images that begin documents of the eval sources, with their
    documents' metadata (only documents whose metadata has `require_meta`, when given)."""
    docs = pipeline.documents(data_config, data_config.eval_sources, shuffle=False, process_index=0, process_count=1)
    found, seen = [], set()
    for i in range(len(docs)):
        try:
            doc = records.decode(docs[i][2])
        except records.RecordError:
            continue
        meta = doc["meta"]
        first = doc["segments"][0]
        if "image" not in first or (require_meta and require_meta not in meta):
            continue
        digest = hashlib.sha1(first["image"]).digest()
        if digest in seen:
            continue
        seen.add(digest)
        found.append((media.decode_image(first["image"], image_size), meta))
        if len(found) == count:
            break
    return found


def generate_captions(model, params, tokenizer: Tokenizer, special, images: np.ndarray, *, max_new_tokens: int = 12,
                      batch_size: int = 64) -> list[str]:
    """Greedy captions for uint8 images [N, S, S, 3]. In a multi-process run every process calls
    this with the same images (the parameters may span all processes' devices) and gets all captions."""
    prompt = [tokenizer.bos_id] + tokens_lib.image_block(special, model.visual_tokens_per_image)
    settings = decoding.TextSettings(max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,))
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        tokens = np.tile(np.asarray(prompt, np.int32), (len(chunk), 1))
        state = decoding.start(model, len(chunk), len(prompt) + max_new_tokens)
        state = decoding.feed(model, params, state, tokens, np.ones_like(tokens), chunk[:, None])
        out, lengths, _ = decoding.decode_text(model, params, state, jax.random.key(0), settings)
        out, lengths = mesh_lib.to_host((out, lengths))
        captions += [tokenizer.decode(row[:n]) for row, n in zip(out, lengths)]
    return captions


def names_digit(caption: str, digit: int) -> bool:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return NAMES[digit] in words and not (words & (set(NAMES) - {NAMES[digit]}))


def digit_caption_accuracy(model, params, tokenizer, special, data_config, image_size: int, count: int):
    """(accuracy, [(caption, digit)]) over `count` held-out digit images."""
    samples = held_out_images(data_config, image_size, count, require_meta="digit")
    captions = generate_captions(model, params, tokenizer, special, np.stack([pixels for pixels, _ in samples]))
    digits = [int(meta["digit"]) for _, meta in samples]
    accuracy = float(np.mean([names_digit(c, d) for c, d in zip(captions, digits)]))
    return accuracy, list(zip(captions, digits))

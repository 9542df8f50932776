"""Prompts: what a user writes -> segments -> token ids and images, batched with left padding.

Prompt syntax (one string):
    <image:PATH>    an input image (PNG/JPEG); <video:PATH> a video's frames, one block each
    <image>         the next image given separately (the CLI's --image, in order)
    [IMG]           generate an image here (the prompt may go on after it: interleaved outputs)
    anything else   text; special tokens written in their text form ([USER], [ASSISTANT], ...)
                    become their ids. Text next to an image or a request is stripped, as the
                    training documents hold text segments without surrounding spaces.
A prompt that does not end in [IMG] asks for text at its end.

The token layout is the training documents': `<s>`, then each segment in order, an image as
`[IMG] <image> x n [/IMG]`, an image request as `[IMG]` (the model regresses the n embeddings).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from emu_jax.data import media
from emu_jax.models import tokens as tokens_lib

IMAGE_REQUEST = "[IMG]"
_PLACEHOLDER = re.compile(r"(<image:[^>]+>|<video:[^>]+>|<image>|\[IMG\])")


@dataclasses.dataclass(frozen=True)
class ImageInput:
    pixels: np.ndarray  # uint8 [S, S, 3]


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """Generate an image at this point."""


class PromptError(ValueError):
    """A prompt that cannot be built (names the placeholder or file)."""


def load_image(path: str, size: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            return media.decode_image(f.read(), size)
    except Exception as e:  # noqa: BLE001 - named with the file
        raise PromptError(f"{path}: not a readable image: {e}") from e


def load_video(path: str, size: int, frames: int) -> list[np.ndarray]:
    try:
        with open(path, "rb") as f:
            return list(media.decode_video(f.read(), size, frames))
    except Exception as e:  # noqa: BLE001
        raise PromptError(f"{path}: not a readable video: {e}") from e


def parse(prompt: str, image_size: int, images: list[np.ndarray] = (), video_frames: int = 8) -> list:
    """A prompt string -> segments: str, ImageInput, ImageRequest (in order)."""
    segments, given = [], list(images)
    parts = _PLACEHOLDER.split(prompt)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            text = part
            if i > 0:
                text = text.lstrip()
            if i < len(parts) - 1:
                text = text.rstrip()
            if text:
                segments.append(text)
        elif part == IMAGE_REQUEST:
            segments.append(ImageRequest())
        elif part == "<image>":
            if not given:
                raise PromptError(f"the prompt has more <image> placeholders than images given ({len(images)})")
            segments.append(ImageInput(np.asarray(given.pop(0), np.uint8)))
        elif part.startswith("<image:"):
            segments.append(ImageInput(load_image(part[7:-1], image_size)))
        else:
            segments += [ImageInput(f) for f in load_video(part[7:-1], image_size, video_frames)]
    if given:
        raise PromptError(f"{len(given)} image(s) given but the prompt has no <image> placeholder left for them")
    return segments


def chat(user: str, system: str = "", history: tuple[tuple[str, str], ...] = ()) -> str:
    """An instruction-tuned checkpoint's prompt: `{system} [USER]: {user} [ASSISTANT]:`, earlier
    turns (user, assistant) first, each `[USER]: ... [ASSISTANT]: ...`. Image placeholders may sit
    in any user message."""
    turns = [f"[USER]: {u} [ASSISTANT]: {a}" for u, a in history] + [f"[USER]: {user} [ASSISTANT]:"]
    return " ".join(([system] if system else []) + turns)


def few_shot(demonstrations, query: np.ndarray, query_text: str = "") -> list:
    """k (image, text) demonstrations then the query image (and the start of its text, e.g. a
    question), as the in-context documents are laid out: image, its text, image, its text, ..."""
    segments = []
    for pixels, text in demonstrations:
        segments += [ImageInput(np.asarray(pixels, np.uint8)), text]
    segments.append(ImageInput(np.asarray(query, np.uint8)))
    return segments + ([query_text] if query_text else [])


def split_at_requests(segments: list) -> list[list]:
    """Segments -> chunks, each ending at an image request (the last chunk may end in text)."""
    chunks, current = [], []
    for segment in segments:
        current.append(segment)
        if isinstance(segment, ImageRequest):
            chunks.append(current)
            current = []
    if current or not chunks:
        chunks.append(current)
    return chunks


def encode(segments: list, tokenizer, special, visual_tokens: int, bos: bool = True) -> tuple[list[int], list]:
    """Segments -> (token ids, images in order)."""
    ids, images = ([tokenizer.bos_id] if bos else []), []
    for segment in segments:
        if isinstance(segment, str):
            ids += tokenizer.encode(segment)
        elif isinstance(segment, ImageInput):
            ids += tokens_lib.image_block(special, visual_tokens)
            images.append(segment.pixels)
        else:
            ids.append(special["img"])
    return ids, images


def left_pad(rows: list[list[int]], row_images: list[list], image_size: int, pad_id: int) -> dict:
    """Token rows and their images -> {tokens, valid [B, T] (left-padded), images uint8 [B, N, S, S, 3]
    or None}; a row with fewer images is padded with blank ones it never uses."""
    length = max(len(r) for r in rows)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    valid = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        tokens[b, length - len(row):] = row
        valid[b, length - len(row):] = 1
    count = max(len(i) for i in row_images)
    images = None
    if count:
        images = np.zeros((len(rows), count, image_size, image_size, 3), np.uint8)
        for b, row in enumerate(row_images):
            for n, pixels in enumerate(row):
                images[b, n] = pixels
    return dict(tokens=tokens, valid=valid, images=images)

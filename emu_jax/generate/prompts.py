"""Prompts: what a user writes -> segments -> token ids and images, batched with left padding.

Prompt syntax (one string):
    <image:PATH>        an input image (PNG/JPEG)
    <video:PATH>        a video: its sampled frames, laid out as the family's release does
                        (Emu2: `[VIDEO]` then a `[gIMG]` block per frame; Emu1: an image block each)
    <image>             the next image given separately (the CLI's --image, in order)
    <box:X1,Y1,X2,Y2>   Emu2-Gen's box image: a black 448x448 canvas with a white rectangle from
                        (X1, Y1) to (X2, Y2) in its pixels, drawn as the release's demo draws it
    [IMG]               generate an image here (the prompt may go on after it: interleaved outputs)
    \\ before any of these  writes it as text instead: `\\[IMG]` is the [IMG] token itself, not a
                        request (Emu-I's system message holds a literal `[IMG]ImageContent[/IMG]`)
    anything else       text, exactly as written: spaces included (the release's tokenizer gives a
                        space next to a special token or an image a token of its own); special
                        tokens in their text form ([USER], </s>, <grounding>, <phrase>, ...) become
                        their ids
A prompt that does not end in [IMG] asks for text at its end. A placeholder left open
(`<image:a.png what is it`) is an error naming its position.

The token layout is the release's: `<s>`, then each segment in order, an image as
`[IMG] <image> x n [/IMG]`, a video as `tokens.video_block`, an image request as `[IMG]` (the model
regresses the n embeddings). `emu2_chat`, `emu_i_chat` and `generation_inputs` build the
release's chat and Emu2-Gen prompts; tests/test_prompts.py holds them to its token ids.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from emu_jax import chat
from emu_jax import tokens as tokens_lib
from emu_jax.data import media

IMAGE_REQUEST = "[IMG]"
_PLACEHOLDER = r"<image:[^>]*>|<video:[^>]*>|<box:[^>]*>|<image>|\[IMG\]"
# group 1: an escaped placeholder (text); group 2: a placeholder
_TOKEN = re.compile(rf"\\({_PLACEHOLDER})|({_PLACEHOLDER})")
_OPEN = re.compile(r"(?<!\\)<(image|video|box):")

# The release's system messages (emu_jax/chat.py), [IMG] escaped: in a prompt it would ask for an image.
EMU2_SYSTEM, EMU2_GROUNDING_SYSTEM = chat.EMU2_SYSTEM, chat.EMU2_GROUNDING_SYSTEM
EMU_I_IMAGE_SYSTEM = chat.EMU_I_IMAGE_SYSTEM.replace("[IMG]", "\\[IMG]")
EMU_I_VIDEO_SYSTEM = chat.EMU_I_VIDEO_SYSTEM.replace("[IMG]", "\\[IMG]")


@dataclasses.dataclass(frozen=True)
class ImageInput:
    pixels: np.ndarray  # uint8 [S, S, 3]


@dataclasses.dataclass(frozen=True)
class VideoInput:
    frames: np.ndarray  # uint8 [F, S, S, 3]


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


# ----------------------------------------------------------------------------- boxes

def _box(spec: str, size: int, position: int) -> np.ndarray:
    try:
        x1, y1, x2, y2 = (int(v) for v in spec.split(","))
    except ValueError:
        raise PromptError(f"prompt position {position}: <box:{spec}> needs four integers X1,Y1,X2,Y2") from None
    pixels = media.box_image(x1, y1, x2, y2)
    return pixels if size == media.BOX_CANVAS else media.resize(Image.fromarray(pixels), size)


# ----------------------------------------------------------------------------- parsing

def _check_closed(text: str, offset: int) -> None:
    opened = _OPEN.search(text)
    if opened:
        raise PromptError(f"prompt position {offset + opened.start()}: <{opened.group(1)}: is never closed with '>'")


def parse(prompt: str, image_size: int, images: list[np.ndarray] = (), video_frames: int = 8) -> list:
    """A prompt string -> segments: str, ImageInput, VideoInput, ImageRequest (in order)."""
    segments, given, text, end = [], list(images), "", 0

    def flush():
        nonlocal text
        if text:
            segments.append(text)
        text = ""

    for match in _TOKEN.finditer(prompt):
        _check_closed(prompt[end:match.start()], end)
        text += prompt[end:match.start()]
        end = match.end()
        if match.group(1):
            text += match.group(1)
            continue
        placeholder = match.group(2)
        flush()
        if placeholder == IMAGE_REQUEST:
            segments.append(ImageRequest())
        elif placeholder == "<image>":
            if not given:
                raise PromptError(f"the prompt has more <image> placeholders than images given ({len(images)})")
            segments.append(ImageInput(np.asarray(given.pop(0), np.uint8)))
        elif placeholder.startswith("<image:"):
            segments.append(ImageInput(load_image(placeholder[7:-1], image_size)))
        elif placeholder.startswith("<video:"):
            segments.append(VideoInput(np.stack(load_video(placeholder[7:-1], image_size, video_frames))))
        else:
            segments.append(ImageInput(_box(placeholder[5:-1], image_size, match.start())))
    _check_closed(prompt[end:], end)
    text += prompt[end:]
    flush()
    if given:
        raise PromptError(f"{len(given)} image(s) given but the prompt has no <image> placeholder left for them")
    return segments


# ----------------------------------------------------------------------------- the release's prompts

def emu2_chat(messages: list[str], grounding: bool = False) -> str:
    """Emu2-Chat's prompt (emu_jax/chat.py's "emu2_chat"): the system message, then `" [USER]: "`
    before the first user message, `" [ASSISTANT]: "` before each answer, `"</s>[USER]: "` before
    each later user message, and `" [ASSISTANT]:"` at the end. Grounding mode has its own system
    message and ends in `<grounding>` (boxes as text, see `chat.box_text`). `messages` alternate user,
    assistant, ..., ending with the user's; placeholders may sit in any of them."""
    try:
        text = chat.prompt(chat.FORMATS["emu2_chat"], messages, EMU2_GROUNDING_SYSTEM if grounding else None)
    except chat.ChatError as e:
        raise PromptError(str(e)) from None
    return text + ("<grounding>" if grounding else "")


def emu_i_chat(user: str, system: str = "", history: tuple[tuple[str, str], ...] = ()) -> str:
    """Emu-I's prompt (emu_jax/chat.py's "emu_i"): `{system} [USER]: {user} [ASSISTANT]:`, stripped;
    earlier turns (user, assistant), our extension, come first as `[USER]: ... [ASSISTANT]: ...`.
    System messages: EMU_I_IMAGE_SYSTEM, EMU_I_VIDEO_SYSTEM."""
    return chat.prompt(chat.FORMATS["emu_i"], [m for turn in history for m in turn] + [user], system)


# ----------------------------------------------------------------------------- token ids

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


def encode(segments: list, tokenizer, special, visual_tokens: int, frame_tokens: int,
           bos: bool = True) -> tuple[list[int], list]:
    """Segments -> (token ids, images in block order: a video's frames one by one)."""
    ids, images = ([tokenizer.bos_id] if bos else []), []
    for segment in segments:
        if isinstance(segment, str):
            ids += tokenizer.encode(segment)
        elif isinstance(segment, ImageInput):
            ids += tokens_lib.image_block(special, visual_tokens)
            images.append(segment.pixels)
        elif isinstance(segment, VideoInput):
            ids += tokens_lib.video_block(special, frame_tokens, len(segment.frames))
            images += list(segment.frames)
        else:
            ids.append(special["img"])
    return ids, images


@dataclasses.dataclass(frozen=True)
class GenerationInputs:
    """What Emu2-Gen's pipeline (Emu2/emu/diffusion.py) feeds its multimodal encoder."""
    autoencode: bool  # an image alone: its pooled EVA features condition the decoder, no LLM
    ids: list[int]  # otherwise: the prompt through the [IMG] whose n embeddings are regressed
    images: list  # uint8 [S, S, 3] in block order (autoencoding: the one image)


def generation_inputs(segments: list, tokenizer, special, visual_tokens: int) -> GenerationInputs:
    """An Emu2-Gen prompt (text, images, `<box:...>` images; `<grounding>`, `<phrase>`,
    `<object>` as text) -> GenerationInputs. The request is implicit (a trailing [IMG] is
    allowed). Classifier-free guidance contrasts with `generation_inputs([], ...)` (ids `<s> [IMG]`)
    or, when autoencoding, with an image of zeros after EVA's normalisation (the mean colour)."""
    if segments and isinstance(segments[-1], ImageRequest):
        segments = segments[:-1]
    for segment in segments:
        if isinstance(segment, (ImageRequest, VideoInput)):
            raise PromptError(f"an Emu2-Gen prompt holds text and images only, not {type(segment).__name__}")
    images = [s.pixels for s in segments if isinstance(s, ImageInput)]
    if images and len(images) == len(segments):
        if len(images) > 1:
            raise PromptError(f"an image alone is autoencoded, and only one: the prompt has {len(images)} and no text")
        return GenerationInputs(True, [], images)
    ids, images = encode(segments + [ImageRequest()], tokenizer, special, visual_tokens, visual_tokens)
    return GenerationInputs(False, ids, images)


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

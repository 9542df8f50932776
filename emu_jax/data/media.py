"""Decoding images and videos into the model's square RGB inputs.

Images are squash-resized (no crop, aspect ratio not kept) with bicubic filtering, as the Emu
release preprocesses; the pipeline hands uint8 [H, W, 3] to the device, where
`normalize` applies the EVA-CLIP mean/std (a quarter of the host-to-device bytes of float32).
Videos give n frames, one from the middle of each of n equal segments of the clip.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from emu_jax.data.records import RecordError
from emu_jax.models.eva_vit import EVA_MEAN, EVA_STD


def decode_image(encoded: bytes, size: int) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3]; RecordError("bad_image") if they do not decode."""
    if not encoded:
        raise RecordError("missing_image", "image segment has no bytes")
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()  # decodes fully, so truncated files fail here and not later
            return resize(img, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RecordError("bad_image", f"image does not decode: {e}") from e


def resize(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)


def segment_midpoints(num_frames: int, count: int) -> list[int]:
    """Indices of the middle frame of each of `count` equal segments of `num_frames` frames."""
    return [min(int((i + 0.5) * num_frames / count), num_frames - 1) for i in range(count)]


def decode_video(encoded: bytes, size: int, count: int) -> np.ndarray:
    """Container bytes (anything PyAV reads) -> uint8 [count, size, size, 3]."""
    import av
    if not encoded:
        raise RecordError("missing_video", "video segment has no bytes")
    try:
        with av.open(io.BytesIO(encoded)) as container:
            decoded = [frame.to_image() for frame in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise RecordError("bad_video", f"video does not decode: {e}") from e
    if not decoded:
        raise RecordError("bad_video", "video has no frames")
    return np.stack([resize(decoded[i], size) for i in segment_midpoints(len(decoded), count)])


def decode_frames(encoded_frames: list[bytes], size: int, count: int) -> np.ndarray:
    """A list of encoded frames -> uint8 [count, size, size, 3], midpoint-sampled like a video."""
    if not encoded_frames:
        raise RecordError("bad_video", "frame list is empty")
    return np.stack([decode_image(encoded_frames[i], size)
                     for i in segment_midpoints(len(encoded_frames), count)])


def normalize(images_uint8):
    """uint8 [..., 3] -> float32 normalised with the EVA-CLIP mean and std (numpy or jax arrays)."""
    mean = np.asarray(EVA_MEAN, np.float32) * 255.0
    std = np.asarray(EVA_STD, np.float32) * 255.0
    return (images_uint8.astype(np.float32) - mean) / std


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()

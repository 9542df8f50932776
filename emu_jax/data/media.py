"""Decoding images and videos into the model's square RGB inputs.

Images are squash-resized (no crop, aspect ratio not kept) with bicubic filtering, as the Emu
release preprocesses; the pipeline hands uint8 [H, W, 3] to the device (a quarter of the
host-to-device bytes of float32), where the model normalises them itself.
Videos give n frames, one from the middle of each of n equal segments of the clip; only those
are decoded (and the frames they depend on: from the keyframe before each), not the whole clip.
"""
from __future__ import annotations

import bisect
import io

import numpy as np
from PIL import Image

from emu_jax.data.records import RecordError


def decode_image(encoded: bytes, size: int, draft: bool = False) -> np.ndarray:
    """Encoded bytes -> uint8 [size, size, 3]; RecordError("bad_image") if they do not decode.
    `draft`: a JPEG larger than twice `size` is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps both sides >= `size`, then resized: a fraction of the decoding work, and pixels
    within a few levels of the full decode's (the training pipeline's choice; prompts and
    evaluation decode fully, as the release does)."""
    if not encoded:
        raise RecordError("missing_image", "image segment has no bytes")
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            if draft:
                img.draft(img.mode, (size, size))  # a no-op for other formats
            img.load()  # decodes fully, so truncated files fail here and not later
            return resize(img, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RecordError("bad_image", f"image does not decode: {e}") from e


def resize(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)


BOX_CANVAS = 448  # Emu2-Gen's box images: EVA's input size
BOX_HALF_WIDTH = 2  # the demo's cv2.rectangle(thickness=3) lights the pixels within 2 of the outline


def box_image(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """Emu2-Gen's box image, uint8 [448, 448, 3]: black, with a white rectangle outline 5 pixels
    wide with rounded corners, as the demo's `cv2.rectangle(..., (255, 255, 255), 3)` draws it;
    corners clamped into the canvas and ordered as the demo does."""
    x1, x2 = sorted(min(BOX_CANVAS, max(0, v)) for v in (x1, x2))
    y1, y2 = sorted(min(BOX_CANVAS, max(0, v)) for v in (y1, y2))
    y, x = np.arange(BOX_CANVAS)[:, None], np.arange(BOX_CANVAS)[None, :]
    along_x, along_y = np.clip(x, x1, x2) - x, np.clip(y, y1, y2) - y  # offsets to the nearest point of each side
    nearest = np.minimum.reduce([along_x ** 2 + (y - y1) ** 2, along_x ** 2 + (y - y2) ** 2,
                                 along_y ** 2 + (x - x1) ** 2, along_y ** 2 + (x - x2) ** 2])
    return np.repeat((nearest <= BOX_HALF_WIDTH ** 2)[..., None] * np.uint8(255), 3, axis=-1)


def segment_midpoints(num_frames: int, count: int) -> list[int]:
    """Indices of the middle frame of each of `count` equal segments of `num_frames` frames."""
    return [min(int((i + 0.5) * num_frames / count), num_frames - 1) for i in range(count)]


def frame_timestamps(container, stream) -> tuple[list[int], list[int]] | None:
    """Presentation timestamps of every frame and of every keyframe, in presentation order, read
    from the packets alone (demuxing decodes no pixels); None when there is nothing to seek by (a
    raw elementary stream has no timestamps)."""
    frames, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the end-of-stream marker
            continue
        if packet.pts is None:
            return None
        frames.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
    return (sorted(frames), sorted(keyframes)) if keyframes else None


def _decoded(container, stream):
    for packet in container.demux(stream):
        yield from packet.decode()  # the end-of-stream packet flushes the frames the decoder holds


def frames_at(container, stream, targets: list[int], keyframes: list[int]) -> list:
    """The decoded frame at each of the ascending presentation timestamps `targets`: seeks to the
    keyframe at or before a target, unless the decoder already stands at or past that keyframe,
    then decodes forward to the target (the frames in between must be decoded: later frames are
    predicted from them)."""
    found, frames, last = [], None, None
    for target in targets:
        keyframe = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
        if last is None or last.pts < keyframe:
            container.seek(keyframe, stream=stream, backward=True)  # seeking also flushes the decoder
            frames, last = _decoded(container, stream), None
        while last is None or last.pts < target:
            frame = next(frames, None)
            if frame is None:  # the decoder gave fewer frames than the packets promised
                break
            last = frame
        if last is None:
            raise RecordError("bad_video", "video has no frames")
        found.append(last)
    return found


def sampled_frames(encoded: bytes, count: int) -> list[Image.Image]:
    """The frames at the segment midpoints of a clip, decoded by seeking where its packets carry
    timestamps, by decoding it all where they do not."""
    import av
    with av.open(io.BytesIO(encoded)) as container:
        stream = container.streams.video[0]
        timestamps = frame_timestamps(container, stream)
        if timestamps is not None:
            frames, keyframes = timestamps
            targets = [frames[i] for i in segment_midpoints(len(frames), count)] if frames else []
            return [frame.to_image() for frame in frames_at(container, stream, targets, keyframes)]
    with av.open(io.BytesIO(encoded)) as container:  # demuxing consumed it; no seeking without timestamps
        decoded = list(container.decode(video=0))
        return [decoded[i].to_image() for i in segment_midpoints(len(decoded), count)] if decoded else []


def decode_video(encoded: bytes, size: int, count: int) -> np.ndarray:
    """Container bytes (anything PyAV reads) -> uint8 [count, size, size, 3]."""
    import av
    if not encoded:
        raise RecordError("missing_video", "video segment has no bytes")
    try:
        images = sampled_frames(encoded, count)
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise RecordError("bad_video", f"video does not decode: {e}") from e
    if not images:
        raise RecordError("bad_video", "video has no frames")
    return np.stack([resize(image, size) for image in images])


def decode_frames(encoded_frames: list[bytes], size: int, count: int) -> np.ndarray:
    """A list of encoded frames -> uint8 [count, size, size, 3], midpoint-sampled like a video."""
    if not encoded_frames:
        raise RecordError("bad_video", "frame list is empty")
    return np.stack([decode_image(encoded_frames[i], size)
                     for i in segment_midpoints(len(encoded_frames), count)])


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()

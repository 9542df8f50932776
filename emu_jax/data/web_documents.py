"""Web-scale samples -> documents, for every reader of them: a webdataset sample (tar members
sharing a key) and a Parquet row (img2dataset's columns, or OBELICS' interleaved `texts` /
`images`). Grain's sources (`emu_jax.data.webdata`) and the Beam conversion
(`emu_jax.data.beam_write`) both use these, so a document is the same whichever reads it; this
module needs neither (only pyarrow, for `parquet_rows`).

A sample or row that cannot become a document comes back as `records.Unreadable` with kind
"malformed", naming where.
"""
from __future__ import annotations

import json
import os

from emu_jax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv")
TEXT_EXTENSIONS = ("txt", "caption")
IMAGE_COLUMNS = ("jpg", "image", "png", "webp")
CAPTION_COLUMNS = ("caption", "txt", "text")


def sample_document(sample: dict, where: str) -> bytes | records.Unreadable:
    """A webdataset sample {extension: bytes, "__key__"} -> an encoded document: its image or video,
    then its caption."""
    media = next(((kind, sample[ext]) for kind, exts in (("image", IMAGE_EXTENSIONS), ("video", VIDEO_EXTENSIONS))
                  for ext in exts if ext in sample), None)
    caption = next((sample[ext] for ext in TEXT_EXTENSIONS if ext in sample), None)
    if caption is None and "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
    if media is None or caption is None:
        missing = "image or video" if media is None else "caption (.txt, or json 'caption')"
        return records.Unreadable(f"{where}: sample {sample.get('__key__', '?')!r} has no {missing}", "malformed")
    text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
    kind, data = media
    return records.encode(records.document([{kind: bytes(data)}, records.text(text.strip())], "webdataset",
                                           key=str(sample.get("__key__", ""))))


def stream_samples(path: str, fileobj=None):
    """A tar shard (`path`, or the stream `fileobj` opened from it) read front to back (no index, no
    seeking: a pipe or a bucket works), as webdataset groups it: consecutive members sharing a key
    are one sample {extension: bytes, "__key__"}. A shard that stops reading ends with an
    Unreadable naming where it stopped."""
    import tarfile
    sample, count = {}, 0
    try:
        with tarfile.open(None if fileobj else path, "r|*", fileobj=fileobj) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = os.path.basename(member.name).partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample, count = {}, count + 1
                sample.setdefault("__key__", key)
                sample[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield records.Unreadable(f"{path}: stops reading after sample {count}: {e}")
        return
    if sample:
        yield sample


def _media_bytes(value, folder: str, where: str):
    """Bytes from an image cell: the bytes themselves, or a path relative to the file's folder."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' image struct
        return value["bytes"] or _media_bytes(value.get("path"), folder, where)
    if isinstance(value, str):
        return records.read_source(os.path.join(folder, value), where)
    return None


def row_document(row: dict, folder: str, where: str) -> bytes | records.Unreadable:
    """A Parquet row -> an encoded document (an interleaved OBELICS row, or an image and caption)."""
    try:
        if "texts" in row and "images" in row:
            segments = []
            for text, image in zip(row["texts"] or [], row["images"] or []):
                if text is not None:
                    segments.append(records.text(text))
                elif image is not None:
                    data = _media_bytes(image, folder, where)
                    segments.append(records.image(data if data is not None else b""))
            if not segments:
                return records.Unreadable(f"{where}: interleaved row with no text and no image", "malformed")
            return records.encode(records.document(segments, "parquet"))
        image = next((row[c] for c in IMAGE_COLUMNS if row.get(c) is not None), None)
        caption = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
        if image is None or caption is None:
            missing = f"image ({'/'.join(IMAGE_COLUMNS)})" if image is None else f"caption ({'/'.join(CAPTION_COLUMNS)})"
            return records.Unreadable(f"{where}: row has no {missing}", "malformed")
        return records.encode(records.document([records.image(_media_bytes(image, folder, where)),
                                                records.text(str(caption))], "parquet"))
    except records.SourceError as e:  # an image path that does not read
        return records.Unreadable(str(e), "missing_image")


def parquet_rows(source):
    """A Parquet file's (a path, or a seekable file object) rows in order, as dicts, a row group at a time."""
    import pyarrow.parquet as pq
    file = pq.ParquetFile(source)
    for group in range(file.num_row_groups):
        yield from file.read_row_group(group).to_pylist()

"""The record format: one record is one document, an ordered list of segments.

    {"segments": [{"text": "a dog on a beach"},
                  {"image": <encoded bytes>},
                  {"video": <encoded container bytes>}  or  {"frames": [<encoded bytes>, ...]}],
     "source": "laion", "meta": {...}}

Records are msgpack bytes, stored in ArrayRecord shards (`ShardWriter`) or as the `document`
feature of a TFDS dataset; both reach the pipeline as the same bytes.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import msgpack

SEGMENT_KINDS = ("text", "image", "video", "frames")


class RecordError(ValueError):
    """A record that cannot be used; `kind` names the counter it is skipped under."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SourceError(ValueError):
    """A source file or line that cannot be turned into records; the message names where."""


def read_source(path: str, where: str) -> bytes:
    """The bytes of a file a source refers to, or a SourceError naming `where` it was referred from."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"{where}: cannot read {path}: {e.strerror}") from e


def text(value: str) -> dict:
    return {"text": value}


def image(encoded: bytes) -> dict:
    return {"image": encoded}


def video(encoded: bytes) -> dict:
    return {"video": encoded}


def frames(encoded_frames: list[bytes]) -> dict:
    return {"frames": list(encoded_frames)}


def document(segments: list[dict], source: str = "", **meta: Any) -> dict:
    return {"segments": segments, "source": source, "meta": meta}


def segment_kind(segment: dict) -> str:
    kinds = [k for k in SEGMENT_KINDS if k in segment]
    if len(kinds) != 1:
        raise RecordError("malformed", f"segment must have exactly one of {SEGMENT_KINDS}, got {sorted(segment)}")
    return kinds[0]


def encode(doc: dict) -> bytes:
    """Validates the document's shape and serialises it."""
    if not isinstance(doc.get("segments"), list) or not doc["segments"]:
        raise RecordError("empty_document", "a document needs at least one segment")
    for segment in doc["segments"]:
        kind = segment_kind(segment)
        if kind == "text" and not isinstance(segment["text"], str):
            raise RecordError("malformed", f"text segment holds {type(segment['text']).__name__}, not str")
        if kind in ("image", "video") and not isinstance(segment[kind], (bytes, bytearray)):
            raise RecordError("malformed", f"{kind} segment must hold encoded bytes")
    return msgpack.packb(doc, use_bin_type=True)


def decode(record: bytes) -> dict:
    """Bytes -> document. Text arrives as bytes and is checked as UTF-8 here, so that a bad
    record names its problem instead of failing later."""
    try:
        doc = msgpack.unpackb(record, raw=True)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise RecordError("malformed", f"not a msgpack document: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get(b"segments"), list):
        raise RecordError("malformed", "record is not a document with a segment list")
    segments = []
    for raw in doc[b"segments"]:
        segment = {k.decode(): v for k, v in raw.items()}
        kind = segment_kind(segment)
        if kind == "text":
            try:
                segment["text"] = segment["text"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError("invalid_utf8", f"text segment is not UTF-8: {e}") from e
        segments.append(segment)
    if not segments or all(segment_kind(s) == "text" and not s["text"].strip() for s in segments):
        raise RecordError("empty_document", "document has no content")
    source = doc.get(b"source", b"")
    return {"segments": segments, "source": source.decode("utf-8", "replace") if isinstance(source, bytes) else "",
            "meta": doc.get(b"meta", {})}


class ShardWriter:
    """Writes encoded documents round-robin into `num_shards` ArrayRecord files
    `{prefix}-{i:05d}-of-{n:05d}.array_record`. Files are written under a temporary name and
    renamed on `close`, so an interrupted write leaves nothing that looks finished."""

    def __init__(self, prefix: str, num_shards: int = 1):
        from array_record.python.array_record_module import ArrayRecordWriter
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.paths = [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
        self._writers = [ArrayRecordWriter(p + ".tmp", "group_size:1") for p in self.paths]
        self.count = 0

    def write(self, doc: dict) -> None:
        self._writers[self.count % len(self._writers)].write(encode(doc))
        self.count += 1

    def close(self) -> None:
        for writer, path in zip(self._writers, self.paths):
            writer.close()
            os.replace(path + ".tmp", path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *unused):
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard behind
            for writer, path in zip(self._writers, self.paths):
                writer.close()
                os.remove(path + ".tmp")


def write_shards(prefix: str, docs: Iterable[dict], num_shards: int = 1) -> list[str]:
    with ShardWriter(prefix, num_shards) as writer:
        for doc in docs:
            writer.write(doc)
    return writer.paths

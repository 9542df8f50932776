"""The record format: one record is one document, an ordered list of segments.

    {"segments": [{"text": "a dog on a beach"},
                  {"image": <encoded bytes>},
                  {"video": <encoded container bytes>}  or  {"frames": [<encoded bytes>, ...]}],
     "source": "laion", "meta": {...}}

A conversation's segments also carry a "role" ("system", "user", "assistant"); the pipeline
renders such a document in the model's chat format and trains on the assistant's segments only.
Elsewhere a segment marked `"context": true` is read but never scored: a generation-tuning
document (Emu2-Gen's recipe) is its prompt as context, then the image to generate.

Records are msgpack bytes, stored in ArrayRecord shards (`ShardWriter`, read back by
`ShardReader`) or as the `document` feature of a TFDS dataset; both reach the pipeline as the same
bytes.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import os
import threading
from typing import Any, Iterable

import msgpack

SEGMENT_KINDS = ("text", "image", "video", "frames")


class RecordError(ValueError):
    """A record that cannot be used; `kind` names the counter it is skipped under."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        # Grain's worker processes pickle the error to the trainer; the default rebuilds it from
        # `args` (the message alone) and fails on the missing `kind`, losing the message.
        return RecordError, (self.kind, str(self))


class SourceError(ValueError):
    """A source file or line that cannot be turned into records; the message names where, `kind`
    what is wrong (the counter a converter that goes on past it counts it under)."""

    def __init__(self, message: str, kind: str = "bad_entry"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return SourceError, (str(self), self.kind)


def read_source(path: str, where: str) -> bytes:
    """The bytes of a file a source refers to, or a SourceError naming `where` it was referred from."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"{where}: cannot read {path}: {e.strerror}", "unreadable_file") from e


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


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands in for a record that could not be read from storage (or, for sources read directly
    such as webdataset shards, could not become a document); `reason` names where, `kind` the
    counter it is skipped under."""
    reason: str
    kind: str = "unreadable"


def decode(record: bytes | Unreadable) -> dict:
    """Bytes -> document. Text arrives as bytes and is checked as UTF-8 here, so that a bad
    record names its problem instead of failing later."""
    if isinstance(record, Unreadable):
        raise RecordError(record.kind, record.reason)
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
        if isinstance(segment.get("role"), bytes):
            segment["role"] = segment["role"].decode("utf-8", "replace")
        if kind == "text":
            try:
                segment["text"] = segment["text"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError("invalid_utf8", f"text segment is not UTF-8: {e}") from e
        segments.append(segment)
    if not segments or all(segment_kind(s) == "text" and not s["text"].strip() for s in segments):
        raise RecordError("empty_document", "document has no content")
    source = doc.get(b"source", b"")
    text = lambda x: x.decode("utf-8", "replace") if isinstance(x, bytes) else x  # noqa: E731  (raw msgpack strings)
    meta = doc.get(b"meta", {})
    return {"segments": segments, "source": text(source) if isinstance(source, bytes) else "",
            "meta": {text(k): text(v) for k, v in meta.items()} if isinstance(meta, dict) else {}}


def temporary_path(path: str) -> str:
    """Where a shard is written until it is finished: a hidden name, which no shard glob
    (`prefix-*`) matches, so that a half-written file (even one a killed writer left) is never read."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp")


class ShardWriter:
    """Writes encoded documents round-robin into `num_shards` ArrayRecord files
    `{prefix}-{i:05d}-of-{n:05d}.array_record`. Files are written under a hidden temporary name
    and renamed once all are closed, so an interrupted write leaves nothing that looks finished."""

    def __init__(self, prefix: str, num_shards: int = 1):
        from array_record.python.array_record_module import ArrayRecordWriter
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.paths = [f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
        self._writers = [ArrayRecordWriter(temporary_path(p), "group_size:1") for p in self.paths]
        self.count = 0

    def write(self, doc: dict) -> None:
        self._writers[self.count % len(self._writers)].write(encode(doc))
        self.count += 1

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for path in self.paths:
            os.replace(temporary_path(path), path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *unused):
        if exc_type is None:
            self.close()
            return
        for writer, path in zip(self._writers, self.paths):  # leave no half-written shard behind
            try:
                writer.close()
            finally:
                if os.path.exists(temporary_path(path)):
                    os.remove(temporary_path(path))


def _open_reader(path: str):
    from array_record.python.array_record_module import ArrayRecordReader
    # random access: no read-ahead of records nobody asked for (as Grain's own source reads)
    return ArrayRecordReader(path, options="readahead_buffer_size:0", file_reader_buffer_size=32768)


def count_records(path: str) -> int:
    """The number of records in an ArrayRecord shard, or a SourceError naming it when it does not
    open: the record index sits at the end of the file, so a truncated shard loses all of them."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such ArrayRecord shard")
    reader = _open_reader(path)
    if reader.ok():
        count = reader.num_records()
        reader.close()
        return count
    with contextlib.suppress(RuntimeError):  # a failed reader's close raises its failure again, with no message
        reader.close()
    raise SourceError(f"{path}: not a readable ArrayRecord shard (truncated or corrupt: its record index does not "
                      f"read)")


class ConcatenatedFiles:
    """Random access (`len`, `[i]`) over the records of several files, as Grain reads a source, from
    {path: number of records}: `locate` finds the file and position of record i, `opened` a file's
    reader (`open`, per subclass), opened lazily in each reader process (readers do not pickle)."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = dict(sizes)
        self._paths = list(self.sizes)
        self._ends = list(itertools.accumulate(self.sizes.values()))
        self._open: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return type(self), (self.sizes,)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(file, position in it) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} outside {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def path(self, shard: int) -> str:
        return self._paths[shard]

    def opened(self, shard: int):
        with self._lock:  # Grain reads from several threads
            if shard not in self._open:
                self._open[shard] = self.open(self._paths[shard])
            return self._open[shard]

    def open(self, path: str):
        raise NotImplementedError


class ShardReader(ConcatenatedFiles):
    """Random access to the records of ArrayRecord shards. A record that does not read back (its
    chunk fails the hash check; a chunk may hold several records, and each of them fails alone)
    comes back as `Unreadable` naming shard and position, so the pipeline skips and counts it, or
    names it in strict mode, like any other bad record."""

    def open(self, path: str):
        return _open_reader(path)

    def __getitem__(self, index: int) -> bytes | Unreadable:
        shard, position = self.locate(index)
        try:
            return self.opened(shard).read([position])[0]
        except RuntimeError as e:  # what the Riegeli reader raises for corrupt bytes
            return Unreadable(f"{self.path(shard)} record {position} does not read: {e}")


def write_shards(prefix: str, docs: Iterable[dict], num_shards: int = 1) -> list[str]:
    with ShardWriter(prefix, num_shards) as writer:
        for doc in docs:
            writer.write(doc)
    return writer.paths

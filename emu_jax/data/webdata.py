"""Web-scale data as people store it, read directly: webdataset tar shards and Parquet files.

Both are random-access Grain sources of documents (msgpack records, as ArrayRecord shards give),
so they shuffle globally, mix by weight, split over hosts and resume exactly as ArrayRecord does
(Grain checkpoints the iterator's position; a resumed run reads the same records next).

webdataset (img2dataset's layout): members `KEY.jpg|png|webp` or `KEY.mp4|webm|avi` with `KEY.txt`
(or a "caption" in `KEY.json`). Shards are indexed for random access by the `wids` package (a
header scan through mmap, once per shard per reader); `path` is a glob, a brace range
(`laion/{00000..00999}.tar`), or wids' shard-list JSON (`{"shardlist": [{"url", "nsamples"}]}`,
`widsindex create`), whose counts spare the scan at start-up. Or streamed (`tar_stream`, no index:
front to back, shards dealt out to hosts and workers, samples mixed in a window), resuming mid-shard
all the same.

Parquet: img2dataset's output (an image column `jpg` / `image` / `png` / `webp` of bytes or paths
relative to the file's folder, and `caption` / `txt` / `text`), or OBELICS' interleaved rows
(`texts` and `images` lists: at each position one of them holds the item). Rows are read a row
group at a time (the last two are kept); training shuffles whole row groups and the rows inside
each (`pipeline.BlockShuffleMapDataset`), so a group is decoded once per epoch per reader.

A sample that cannot become a document (no media, no caption, an interleaved row with neither)
comes back as `records.Unreadable` with kind "malformed", naming shard and position: the pipeline
counts and skips it (data/malformed), or stops a strict run naming it; its bad image bytes are
counted at decode time like any other (data/bad_image).
"""
from __future__ import annotations

import bisect
import collections
import copy
import glob
import itertools
import json
import os
import threading

import grain
from grain.experimental import InterleaveIterDataset, WindowShuffleIterDataset

from emu_jax.data import records
from emu_jax.data.web_documents import row_document, sample_document, stream_samples

def expand_paths(pattern: str) -> list[str]:
    """A glob, a brace range, or both -> the sorted existing files."""
    import braceexpand
    return sorted({path for part in braceexpand.braceexpand(pattern) for path in glob.glob(part)})


# ----------------------------------------------------------------------------- webdataset tar shards

def _tar_samples(path: str):
    from wids.wids import IndexedTarSamples
    return IndexedTarSamples(path=path)


def tar_shard_sizes(pattern: str, strict: bool) -> dict[str, int]:
    """{shard: samples}: from wids' shard-list JSON, or by indexing each shard. A shard that does
    not index (truncated, not a tar) is skipped with a warning naming it, or raises in strict mode."""
    from absl import logging
    if pattern.endswith(".json"):
        with open(pattern) as f:
            listing = json.load(f)
        root = os.path.dirname(pattern)
        return {os.path.join(root, s["url"]): int(s["nsamples"]) for s in listing["shardlist"]}
    sizes = {}
    for path in expand_paths(pattern):
        try:
            samples = _tar_samples(path)
            sizes[path] = len(samples)
            samples.close()
        except Exception as e:  # tarfile / wids raise several types for a broken file
            error = records.SourceError(f"{path}: not a readable tar shard: {e}")
            if strict:
                raise error from e
            logging.warning("skipping shard: %s", error)
    return sizes


class TarShards(records.ConcatenatedFiles):
    """Random access to the samples of webdataset tar shards, as documents."""

    def open(self, path: str):
        return _tar_samples(path)

    def __getitem__(self, index: int) -> bytes | records.Unreadable:
        shard, position = self.locate(index)
        where = f"{self.path(shard)} sample {position}"
        try:
            sample = self.opened(shard)[position]
        except Exception as e:  # a member that does not read back
            return records.Unreadable(f"{where} does not read: {e}")
        return sample_document({k.lstrip("."): v.getvalue() if hasattr(v, "getvalue") else v
                                for k, v in sample.items()}, where)


# ----------------------------------------------------------------------------- webdataset, streamed

class TarStream(grain.IterDataset):
    """One tar shard's samples in order, as (where, document)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __iter__(self):
        return _TarStreamIterator(self.path)


class _TarStreamIterator(grain.DatasetIterator):
    """Its state is the number of samples read: a restored iterator reopens the shard and reads
    past that many (a resumed run continues with the same sample, not the shard's first)."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.position, self._samples = path, 0, None

    def __next__(self) -> tuple[str, bytes | records.Unreadable]:
        if self._samples is None:
            self._samples = stream_samples(self.path)
            for _ in range(self.position):
                next(self._samples, None)
        sample = next(self._samples)  # StopIteration: the shard is done
        where = f"{self.path} sample {self.position}"
        self.position += 1
        return where, sample if isinstance(sample, records.Unreadable) else sample_document(sample, where)

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position, self._samples = int(state["position"]), None


def tar_stream(pattern: str, *, shuffle: bool, seed: int, process_index: int, process_count: int,
               open_shards: int, window: int):
    """webdataset tar shards streamed, as a Grain IterDataset of (where, document): the shards
    (reshuffled every epoch and repeated when `shuffle`) dealt out to hosts, and by Grain to each
    host's workers; each reader interleaves `open_shards` shards; training mixes samples in a
    window of `window` (Grain checkpoints every position: shard sequence, samples into each open
    shard, the window's start)."""
    paths = expand_paths(pattern)
    if not paths:
        raise FileNotFoundError(f"no webdataset tar shards match {pattern!r}")
    shards = grain.MapDataset.source(paths)
    if shuffle:
        shards = shards.shuffle(seed=seed).repeat()
    ds = InterleaveIterDataset(shards[process_index::process_count].map(TarStream), cycle_length=open_shards)
    return WindowShuffleIterDataset(_CopiedState(ds), window_size=window, seed=seed) if shuffle else ds


class _CopiedState(grain.IterDataset):
    """Its parent, restored from a copy of the state given. Grain 0.2.18's interleave keeps lists of
    the state it is restored from and advances them, and the window shuffle restores it from the
    very dict it keeps as its window's start: without the copy a restored run's next checkpoint
    holds a window start that has moved on, and a second restore reads other samples."""

    def __iter__(self):
        return _CopiedStateIterator(self._parent.__iter__())


class _CopiedStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(copy.deepcopy(state))


# ----------------------------------------------------------------------------- Parquet

def parquet_sizes(pattern: str, strict: bool) -> dict[str, int]:
    from absl import logging
    import pyarrow.parquet as pq
    sizes = {}
    for path in expand_paths(pattern):
        try:
            sizes[path] = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow.ArrowInvalid and OSError for a file that is not Parquet
            error = records.SourceError(f"{path}: not a readable Parquet file: {e}")
            if strict:
                raise error from e
            logging.warning("skipping file: %s", error)
    return sizes


def row_group_rows(pattern: str) -> int:
    """Rows in the first row group of the first file (datasets write them evenly): the block a
    training shuffle keeps together, so that a row group is decoded once per epoch, not per row."""
    import pyarrow.parquet as pq
    paths = expand_paths(pattern)
    return pq.ParquetFile(paths[0]).metadata.row_group(0).num_rows if paths else 1


class _ParquetFile:
    """One file's rows by index, a row group at a time (the last KEEP groups cached). A ParquetFile
    is not safe to read from several threads at once (Grain's prefetch threads crashed the reader
    process): reads of one file take turns."""
    KEEP = 2

    def __init__(self, path: str):
        import pyarrow.parquet as pq
        self.path, self.file = path, pq.ParquetFile(path)
        self.starts = list(itertools.accumulate((self.file.metadata.row_group(g).num_rows
                                                 for g in range(self.file.num_row_groups)), initial=0))
        self._groups: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def row(self, position: int) -> dict:
        group = bisect.bisect_right(self.starts, position) - 1
        with self._lock:
            if group not in self._groups:
                self._groups[group] = self.file.read_row_group(group).to_pylist()
                while len(self._groups) > self.KEEP:
                    self._groups.popitem(last=False)
            return self._groups[group][position - self.starts[group]]


class ParquetRows(records.ConcatenatedFiles):
    """Random access to the rows of Parquet files, as documents."""

    def open(self, path: str):
        return _ParquetFile(path)

    def __getitem__(self, index: int) -> bytes | records.Unreadable:
        shard, position = self.locate(index)
        path = self.path(shard)
        where = f"{path} row {position}"
        try:
            row = self.opened(shard).row(position)
        except Exception as e:  # a row group that does not decode
            return records.Unreadable(f"{where} does not read: {e}")
        return row_document(row, os.path.dirname(path), where)

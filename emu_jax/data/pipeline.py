"""The Grain input pipeline: records -> documents -> token and image arrays -> packed rows -> batches.

    per source: records (ArrayRecord shards, a TFDS split, webdataset tar shards or Parquet files:
    data/webdata.py) -> tag (source, index) -> shuffle -> repeat
    -> mix by weight -> decode + tokenise (worker processes) -> (training) a random view of the
    document's images (`data.augment`, see augment.py) -> this process's slice (lazily: a process
    decodes only its own records)
    (with a streamed source, `STREAMS`: its shards are dealt out to hosts and shuffled in a window;
    the others give this process its slice first; then mix by weight -> decode -> views)
    -> first-fit packing of tokens and image slots -> loss masks -> batch -> multiprocess prefetch

A packed row holds `tokens`, `positions` and `segment_ids` [seq_len] (0 = padding), `images`
uint8 [max_images, S, S, 3] in block order with `image_mask`, `text_mask` and `regression_mask`,
and `events` [len(EVENTS)]: bad records skipped (and documents truncated) since the previous
row, so the trainer can log them. Documents longer than `seq_len` or with more images than
`max_images` are cut before the first image block that does not fit; image blocks are never
split. Bad records (and records that do not read back from a corrupt shard) are skipped and
counted, or, with `strict`, raise an error naming the source and record index (and the shard).
A shard that does not open at all (truncated) is skipped with a warning naming it, or, with
`strict`, stops the run there.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import threading
import time

import grain
import jax
import numpy as np
from absl import logging
from grain.experimental import FirstFitPackIterDataset, index_shuffle

from emu_jax import chat
from emu_jax import tokens as tokens_lib
from emu_jax.data import augment, media, records, webdata
from emu_jax.data.records import RecordError
from emu_jax.data.tokenizer import Tokenizer, load_tokenizer

EVENTS = ("unreadable", "malformed", "empty_document", "invalid_utf8", "missing_image", "bad_image",
          "missing_video", "bad_video", "too_long", "truncated")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the model needs of the data: sizes and the token layout."""
    special: dict
    visual_tokens: int
    frame_tokens: int  # per video frame (see tokens.video_block)
    image_size: int
    video_frames: int
    seq_len: int
    max_images: int
    chat_format: str = "emu2_chat"  # how conversation documents are rendered (emu_jax/chat.py)

    @classmethod
    def from_configs(cls, model_config, data_config, visual_tokens: int) -> "Layout":
        frame_tokens = tokens_lib.frame_tokens(model_config.connector, visual_tokens)
        return cls(dict(model_config.tokens), visual_tokens, frame_tokens, model_config.vit.image_size,
                   data_config.video_frames, data_config.seq_len, data_config.max_images,
                   data_config.get("chat_format", "emu2_chat"))


# ----------------------------------------------------------------------------- sources

def expand(path: str, data_dir: str) -> str:
    return os.path.expanduser(path.replace("{data_dir}", data_dir))


def _tfds_source(path: str, split: str):
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(path).as_data_source(split)


def _document_bytes(example):
    return example["document"]


def open_tfds(source, data_config):
    path = expand(source.path, data_config.data_dir)
    return grain.MapDataset.source(_tfds_source(path, source.split)).map(_document_bytes)


def readable_shards(paths: list[str], strict: bool) -> dict[str, int]:
    """{shard: number of records} of the shards that open. One that does not (truncated: its
    record index is gone, so are its records) is skipped with a warning naming it, or raises
    in strict mode."""
    sizes = {}
    for path in paths:
        try:
            sizes[path] = records.count_records(path)
        except records.SourceError as e:
            if strict:
                raise
            logging.warning("skipping shard: %s", e)
    return sizes


def open_array_record(source, data_config):
    paths = sorted(glob.glob(expand(source.path, data_config.data_dir)))
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shards match {source.path!r}")
    sizes = readable_shards(paths, data_config.strict)
    if not sizes:
        raise records.SourceError(f"none of the {len(paths)} ArrayRecord shards matching {source.path!r} opens")
    return grain.MapDataset.source(records.ShardReader(sizes))


def open_digits(source, data_config):
    """The embedded digits world, built into `path` on first use (seconds)."""
    from emu_jax.data import digits
    dataset_dir = digits.build(expand(source.path, data_config.data_dir))
    return grain.MapDataset.source(_tfds_source(dataset_dir, source.split)).map(_document_bytes)


def _open_sized(reader_cls, sizes_of, what: str):
    def open_source(source, data_config):
        pattern = expand(source.path, data_config.data_dir)
        sizes = sizes_of(pattern, data_config.strict)
        if not sizes:
            raise FileNotFoundError(f"no readable {what} match {source.path!r}")
        return grain.MapDataset.source(reader_cls(sizes))
    return open_source


SOURCES = {"tfds": open_tfds, "array_record": open_array_record, "digits": open_digits,
           "webdataset": _open_sized(webdata.TarShards, webdata.tar_shard_sizes, "webdataset tar shards"),
           "parquet": _open_sized(webdata.ParquetRows, webdata.parquet_sizes, "Parquet files")}


def open_tar_stream(source, data_config, **share) -> grain.IterDataset:
    return webdata.tar_stream(expand(source.path, data_config.data_dir), open_shards=data_config.stream.open_shards,
                              window=data_config.stream.shuffle_window, **share)


# sources without random access: IterDatasets of (where, record), split over hosts by themselves
STREAMS = {"webdataset_stream": open_tar_stream}


@dataclasses.dataclass(frozen=True)
class Tag:
    """Attaches (source name, record index) so that errors can name the record."""
    name: str

    def __call__(self, index, record):
        return self.name, index, record


@dataclasses.dataclass(frozen=True)
class TagStream:
    """(where, record) of a streamed source -> (source name, where, record): `where` names shard and sample."""
    name: str

    def __call__(self, element):
        return (self.name, *element)


# ----------------------------------------------------------------------------- documents

def truncate(ids: list[int], special, seq_len: int, max_images: int) -> tuple[list[int], int]:
    """Cuts ids to at most seq_len tokens and max_images image blocks, never inside a block.
    Returns (ids, number of image blocks kept)."""
    starts = [i for i, t in enumerate(ids) if t == special["img"]]
    ends = [i for i, t in enumerate(ids) if t == special["img_end"]]
    cut = min(len(ids), seq_len)
    if len(starts) > max_images:
        cut = min(cut, starts[max_images])
    for start, end in zip(starts, ends):
        if start < cut <= end:
            cut = start
    if "video" in special and 0 < cut < len(ids) and ids[cut - 1] == special["video"]:
        cut -= 1  # a [VIDEO] whose every frame was cut goes too
    return ids[:cut], sum(end < cut for end in ends)


class TokenizeDocument(grain.transforms.Map):
    """(source, index, record bytes) -> {tokens [L], images uint8 [n, S, S, 3], events [1, E]}."""

    def __init__(self, tokenizer: Tokenizer, layout: Layout, strict: bool = False):
        self.tokenizer, self.layout, self.strict = tokenizer, layout, strict

    def map(self, element):
        name, index, record = element
        try:
            return self._example(records.decode(record))
        except RecordError as e:
            if self.strict:
                raise RecordError(e.kind, f"source {name!r} record {index}: {e}") from e
            return self._empty(e.kind)

    def _pixels(self, segment) -> np.ndarray:
        size, count = self.layout.image_size, self.layout.video_frames
        kind = records.segment_kind(segment)
        if kind == "image":
            return media.decode_image(segment["image"], size, draft=True)[None]
        if kind == "video":
            return media.decode_video(segment["video"], size, count)
        return media.decode_frames(segment["frames"], size, count)

    def _pieces(self, doc) -> list[tuple[dict, bool]]:
        """(segment, is_target) in reading order: a conversation (segments with roles) rendered in
        the layout's chat format, its replies the targets; any other document all but its
        segments marked as context."""
        segments = doc["segments"]
        if not any("role" in s for s in segments):
            return [(s, not s.get("context", False)) for s in segments]
        system = [s["text"] for s in segments if s.get("role") == "system" and "text" in s]
        turns = []
        for segment in segments:
            role = segment.get("role")
            if role not in ("user", "assistant"):
                if role != "system":
                    raise RecordError("malformed", f"a conversation segment has role {role!r}")
                continue
            if not turns or turns[-1][0] != role:
                turns.append((role, []))
            turns[-1][1].append(segment)
        try:
            fmt = chat.get(self.layout.chat_format, grounding=bool(doc["meta"].get("grounding")))
            rendered = chat.pieces(fmt, turns, " ".join(system) if system else None)
        except chat.ChatError as e:
            raise RecordError("malformed", f"conversation: {e}") from e
        return [(records.text(item) if isinstance(item, str) else item, target) for item, target in rendered]

    def _example(self, doc):
        layout, special = self.layout, self.layout.special
        ids, images, targets = [self.tokenizer.bos_id], [], [False]
        for segment, target in self._pieces(doc):
            if "text" in segment:
                new = self.tokenizer.encode(segment["text"])
                ids += new
                targets += [target] * len(new)
                continue
            pixels = self._pixels(segment)
            if records.segment_kind(segment) == "image":
                block = tokens_lib.image_block(special, layout.visual_tokens)
            else:  # the family's video layout: Emu2's [VIDEO] + [gIMG] frame blocks, Emu1's image blocks
                block = tokens_lib.video_block(special, layout.frame_tokens, len(pixels))
            ids += block
            targets += [target] * len(block)
            images += list(pixels)
        ids.append(self.tokenizer.eos_id)
        targets.append(True)
        kept, n_images = truncate(ids, special, layout.seq_len, layout.max_images)
        if len(kept) < 2:
            raise RecordError("too_long", f"first image block does not fit in {layout.seq_len} tokens")
        events = np.zeros((1, len(EVENTS)), np.int32)
        events[0, EVENTS.index("truncated")] = len(kept) < len(ids)
        pixels = np.stack(images[:n_images]) if n_images else self._no_images()
        return {"tokens": np.asarray(kept, np.int32), "targets": np.asarray(targets[:len(kept)], np.int32),
                "images": pixels, "events": events}

    def _no_images(self):
        size = self.layout.image_size
        return np.zeros((0, size, size, 3), np.uint8)

    def _empty(self, kind: str):
        """A skipped record: no tokens, no images, one count. Packing carries the count along."""
        events = np.zeros((1, len(EVENTS)), np.int32)
        events[0, EVENTS.index(kind)] = 1
        return {"tokens": np.zeros((0,), np.int32), "targets": np.zeros((0,), np.int32), "images": self._no_images(),
                "events": events}


@dataclasses.dataclass(frozen=True)
class FinishRow:
    """A packed row -> the model's inputs and loss masks."""
    special: dict

    def __call__(self, row):
        segment_ids = row["tokens_segment_ids"].astype(np.int32)
        text_mask, regression_mask = tokens_lib.loss_masks(row["tokens"], segment_ids, self.special)
        # a prediction is scored only where the next token is a target (a conversation's context is not)
        next_is_target = np.concatenate([row["targets"][1:], np.zeros_like(row["targets"][:1])]) > 0
        text_mask, regression_mask = text_mask * next_is_target, regression_mask * next_is_target
        return {"tokens": row["tokens"].astype(np.int32), "positions": row["tokens_positions"].astype(np.int32),
                "segment_ids": segment_ids, "images": row["images"], "image_mask": row["images_segment_ids"] > 0,
                "text_mask": text_mask, "regression_mask": regression_mask,
                "events": row["events"].sum(0).astype(np.int32)}


# ----------------------------------------------------------------------------- the dataset

class BlockShuffleMapDataset(grain.MapDataset):
    """A new order each epoch that moves whole blocks of `block` consecutive records and shuffles
    the records inside each block: every record once per epoch, and reads stay within a block, which
    a source that decodes blocks at a time (Parquet's row groups) then decodes once, not per record.
    The last, partial block keeps its place (its records are shuffled)."""

    def __init__(self, parent: grain.MapDataset, *, block: int, seed: int):
        super().__init__(parent)
        self._block, self._seed = block, seed

    def __len__(self) -> int:
        return len(self._parent)

    def _shuffled_index(self, index: int) -> int:
        length = len(self._parent)
        epoch, position = divmod(index, length)
        seed = (self._seed + epoch) % 2**32
        full = length // self._block * self._block
        if position < full:
            block, position = divmod(position, self._block)
            size = self._block
            start = index_shuffle(block, max_index=full // self._block - 1, seed=seed, rounds=4) * size
        else:
            start, size, position = full, length - full, position - full
        within = index_shuffle(position, max_index=size - 1, seed=(seed * 7919 + start) % 2**32, rounds=4)
        return epoch * length + start + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled_index(index)]


# sources read a block at a time: the block their training shuffle keeps together
SHUFFLE_BLOCKS = {"parquet": lambda source, data_config: webdata.row_group_rows(expand(source.path,
                                                                                       data_config.data_dir))}


def shuffled(ds: grain.MapDataset, source, data_config, seed: int) -> grain.MapDataset:
    block = SHUFFLE_BLOCKS[source.kind](source, data_config) if source.kind in SHUFFLE_BLOCKS else 1
    return BlockShuffleMapDataset(ds, block=block, seed=seed) if block > 1 else ds.shuffle(seed=seed)


def tagged(data_config, name: str, source, position: int, shuffle: bool) -> grain.MapDataset:
    """One random-access source's tagged records, every process's: shuffled (whole blocks for sources
    read a block at a time) and repeated forever when `shuffle` (training); one pass in order otherwise."""
    if source.kind not in SOURCES:
        known = ", ".join(sorted(SOURCES) + sorted(STREAMS))
        raise ValueError(f"source {name!r}: " + (f"{source.kind} is read front to back, and this reader needs random "
                                                 f"access (kind=webdataset indexes the same shards)" if source.kind in
                                                 STREAMS else f"unknown kind {source.kind!r}; known: {known}"))
    ds = SOURCES[source.kind](source, data_config).map_with_index(Tag(name))
    return shuffled(ds, source, data_config, data_config.seed + position).repeat() if shuffle else ds


def mixture(data_config, sources, *, shuffle: bool) -> grain.MapDataset:
    """Tagged records of the weighted mixture of random-access `sources`, every process's."""
    datasets = [tagged(data_config, name, source, i, shuffle) for i, (name, source) in enumerate(sorted(sources.items()))]
    weights = [source.weight for _, source in sorted(sources.items())]
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def stream_mixture(data_config, sources, *, shuffle: bool, process_index: int, process_count: int) -> grain.IterDataset:
    """This process's tagged records of a mixture with streamed sources: those deal their shards out
    to hosts, the random-access ones give this process its slice; mixed by weight (Grain's mix of
    iterators, checkpointed as the rest)."""
    datasets, weights = [], []
    for i, (name, source) in enumerate(sorted(sources.items())):
        if source.kind in STREAMS:
            ds = STREAMS[source.kind](source, data_config, shuffle=shuffle, seed=data_config.seed + i,
                                      process_index=process_index, process_count=process_count).map(TagStream(name))
        else:
            ds = tagged(data_config, name, source, i, shuffle)[process_index::process_count].to_iter_dataset()
        datasets.append(ds)
        weights.append(source.weight)
    return datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)


def examples(data_config, sources, transform, *, split: str, process_index: int, process_count: int,
             keep=None) -> grain.IterDataset:
    """This process's examples: `transform` (a tagged record -> an example) over the documents that
    `keep` (a filter, or None) keeps, with training's random views (`augmented`)."""
    shuffle = split == "train"
    if not any(source.kind in STREAMS for source in sources.values()):
        ds = mixture(data_config, sources, shuffle=shuffle)
        ds = (ds.filter(keep) if keep else ds).map(transform)
        return augmented(ds, data_config, split)[process_index::process_count].to_iter_dataset()
    ds = stream_mixture(data_config, sources, shuffle=shuffle, process_index=process_index,
                        process_count=process_count)
    return augmented((ds.filter(keep) if keep else ds).map(transform), data_config, split)


def documents(data_config, sources, *, shuffle: bool, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's share of the mixture."""
    return mixture(data_config, sources, shuffle=shuffle)[process_index::process_count]


def augmented(ds, data_config, split: str):
    """Training examples with fresh random views of their images (`data.augment`), drawn before
    the split over processes: a record's view depends on its place in the mixture, not on how many
    processes share it. Evaluation reads the originals."""
    augmentation = augment.from_config(data_config.augment)
    if split != "train" or augmentation is None:
        return ds
    return ds.random_map(augmentation, seed=data_config.seed)


def _process_share(data_config, process_index, process_count) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if data_config.global_batch_size % process_count:
        raise ValueError(f"global batch {data_config.global_batch_size} does not divide over "
                         f"{process_count} processes")
    return process_index, process_count


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: the worker exits once the process that started it has died. A trainer
    killed outright (SIGKILL: the OOM killer, a preemption) cannot stop its workers, which otherwise
    live on, idle, holding their memory (and the shared-memory tracker) beside the next run."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _prefetch(ds, data_config, worker_count):
    workers = data_config.worker_count if worker_count is None else worker_count
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=data_config.worker_buffer_size),
                            worker_init_fn=_exit_with_parent)
    return ds


def make_dataset(data_config, model_config, visual_tokens: int, *, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 worker_count: int | None = None) -> grain.IterDataset:
    """Batches of this process's rows (`data_config.global_batch_size / process_count` each).
    split "train" reads `train_sources` shuffled and repeated; "eval" reads `eval_sources` once."""
    process_index, process_count = _process_share(data_config, process_index, process_count)
    layout = Layout.from_configs(model_config, data_config, visual_tokens)
    sources = data_config.train_sources if split == "train" else data_config.eval_sources
    tokenizer = load_tokenizer(data_config, layout.special)
    ds = examples(data_config, sources, TokenizeDocument(tokenizer, layout, data_config.strict), split=split,
                  process_index=process_index, process_count=process_count)
    ds = FirstFitPackIterDataset(
        ds, length_struct={"tokens": layout.seq_len, "targets": layout.seq_len, "images": layout.max_images,
                           "events": layout.seq_len},
        padding_struct={"tokens": layout.special["pad"], "targets": 0, "images": 0, "events": 0},
        num_packing_bins=data_config.packing_bins, seed=data_config.seed, shuffle_bins=split == "train",
        max_sequences_per_bin=None if data_config.pack else 1)
    ds = ds.map(FinishRow(layout.special)).batch(data_config.global_batch_size // process_count,
                                                 drop_remainder=split == "train")
    return _prefetch(ds, data_config, worker_count)


@dataclasses.dataclass(frozen=True)
class MetaMatches:
    """Keeps the documents whose meta holds every (key, value) of `where` (a record that does not
    decode is kept, for `FirstImage` to count)."""
    where: tuple

    def __call__(self, element) -> bool:
        _, _, record = element
        try:
            meta = records.decode(record)["meta"]
        except RecordError:
            return True
        return all(meta.get(key) == value for key, value in self.where)


class FirstImage(grain.transforms.Map):
    """(source, index, record bytes) -> {images uint8 [S, S, 3], valid, events [E]}: the first
    still image of a document, for image-only training (the visual decoder). A document without
    one, or a bad record, becomes an invalid example that carries its count (`missing_image`,
    `bad_image`, ...) instead of disappearing."""

    def __init__(self, image_size: int, strict: bool = False):
        self.image_size, self.strict = image_size, strict

    def map(self, element):
        name, index, record = element
        events = np.zeros((len(EVENTS),), np.int32)
        pixels = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        try:
            segments = [s for s in records.decode(record)["segments"] if records.segment_kind(s) == "image"]
            if not segments:
                raise RecordError("missing_image", "no still image in the document")
            pixels = media.decode_image(segments[0]["image"], self.image_size)
        except RecordError as e:
            if self.strict:
                raise RecordError(e.kind, f"source {name!r} record {index}: {e}") from e
            events[EVENTS.index(e.kind)] = 1
        return {"images": pixels, "valid": not events.any(), "events": events}


def make_image_dataset(data_config, image_size: int, *, split: str = "train", process_index: int | None = None,
                       process_count: int | None = None, worker_count: int | None = None) -> grain.IterDataset:
    """Batches of single images (the first image of each document) with `valid` and `events`."""
    process_index, process_count = _process_share(data_config, process_index, process_count)
    sources = data_config.train_sources if split == "train" else data_config.eval_sources
    where = data_config.image_documents_where
    ds = examples(data_config, sources, FirstImage(image_size, data_config.strict), split=split,
                  process_index=process_index, process_count=process_count,
                  keep=MetaMatches(tuple(sorted(where.items()))) if where else None)
    ds = ds.batch(data_config.global_batch_size // process_count, drop_remainder=split == "train")
    return _prefetch(ds, data_config, worker_count)


def to_global(batch: dict, mesh, batch_axes=("data", "fsdp")) -> dict:
    """This process's rows -> global `jax.Array`s sharded over the mesh's batch axes. The rows are
    copied out of the data workers' shared memory (on the CPU a device array may alias a host buffer,
    which would keep the worker's block alive past the step and, for the last batch, past exit)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.array(x)), batch)


def model_inputs(batch: dict) -> dict:
    """The model's keyword inputs from a batch (uint8 images: the model normalises them)."""
    return {key: batch[key] for key in ("tokens", "positions", "segment_ids", "images")}

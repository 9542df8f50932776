"""Conversion to ArrayRecord shards as Apache Beam pipelines, for inputs one process cannot
convert: the DirectRunner on one machine, the same code on Dataflow, Flink or Spark.

    python -m emu_jax.data.beam_write pairs --input='laion/part-*.jsonl' --output=out/laion --num_shards=256 \\
        [--image_root=...] [--skip_missing] [Beam options: --runner=DataflowRunner --project=... | \\
        --runner=DirectRunner --direct_num_workers=8 --direct_running_mode=multi_processing]

Kinds: pairs, mmc4, video, storyboard, conversations (JSONL), generation: the same per-line
conversion as `emu_jax.data.write` (`write.ENTRY_WRITERS`); webdataset (tar shards, streamed) and
parquet (img2dataset's or OBELICS' files): the same per-sample / per-row conversion as the
pipeline's direct readers (`web_documents`). A document is the same whichever writes it.

Apache Beam's releases pin protobuf, pyarrow and pillow below this package's locked versions, so
the pipeline runs in an environment of its own (as Dataflow's workers do), which needs only what
`requirements-beam.txt` lists:

    python -m venv beam && beam/bin/pip install -r requirements-beam.txt && beam/bin/pip install --no-deps -e .

A line, sample or row that does not convert (not UTF-8, not JSON, a missing field, an unreadable
image, a sample without a caption, a shard cut short) does not stop the job: it goes to
`<output>-rejects.jsonl` ({"where", "kind", "error"}) and is counted in the job's metrics
(`rejected_<kind>`, beside `documents` and `<segment>_segments`). Documents go to shard
`crc32(where) mod num_shards`, sorted by file and position inside it, so a shard's bytes depend
only on the input. Each shard is written under a hidden name and renamed when complete; a shard
that already exists is kept (`shards_already_written`): a killed job, re-run, finishes the missing
shards and gives the same files as a job never killed. Shards are written with ArrayRecord to a
local or mounted (gcsfuse) path; inputs may be anywhere Beam reads.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from emu_jax.data import records, web_documents, write

NAMESPACE = "emu_jax.data.beam_write"


def shard_path(output: str, shard: int, num_shards: int) -> str:
    return f"{output}-{shard:05d}-of-{num_shards:05d}.array_record"


# ----------------------------------------------------------------------------- inputs: file -> items -> documents
# Each kind reads a file as (position, item) pairs and turns one item into an encoded document
# (raising a SourceError / RecordError, or returning records.Unreadable, for one that does not).

def numbered_lines(path: str):
    with FileSystems.open(path) as f:
        yield from enumerate(f, 1)


def tar_samples(path: str):
    with FileSystems.open(path) as f:  # streamed front to back: no index, no seek
        yield from enumerate(web_documents.stream_samples(path, f))


def parquet_rows(path: str):
    with FileSystems.open(path) as f:
        yield from enumerate(web_documents.parquet_rows(f))


@dataclasses.dataclass(frozen=True)
class JsonlKind:
    """One of `emu_jax.data.write`'s JSONL writers, line by line."""
    kind: str
    image_root: str | None = None
    skip_missing: bool = False
    read = staticmethod(numbered_lines)
    spread = True  # lines are small: spread them over workers before their media are read

    def where(self, path: str, position: int) -> str:
        return f"{path}:{position}"

    def document(self, path: str, raw: bytes, where: str, counts) -> bytes | None:
        entry = write.parse_line(raw, where)
        if entry is None:
            return None  # a blank line
        extra = {"skip_missing": self.skip_missing} if self.kind == "mmc4" else {}
        root = self.image_root or os.path.dirname(path)
        return records.encode(write.ENTRY_WRITERS[self.kind](entry, where, root, counts, **extra))


@dataclasses.dataclass(frozen=True)
class TarKind:
    """webdataset tar shards (img2dataset's layout), as `webdata` reads them."""
    read = staticmethod(tar_samples)
    spread = False  # samples carry their media: a shard per worker, no extra shuffle of the bytes

    def where(self, path: str, position: int) -> str:
        return f"{path} sample {position}"

    def document(self, path: str, sample, where: str, counts):
        return sample if isinstance(sample, records.Unreadable) else web_documents.sample_document(sample, where)


@dataclasses.dataclass(frozen=True)
class ParquetKind:
    """Parquet files (img2dataset's columns, OBELICS' interleaved rows), as `webdata` reads them."""
    read = staticmethod(parquet_rows)
    spread = False

    def where(self, path: str, position: int) -> str:
        return f"{path} row {position}"

    def document(self, path: str, row: dict, where: str, counts):
        return web_documents.row_document(row, os.path.dirname(path), where)


def input_kind(kind: str, image_root: str | None = None, skip_missing: bool = False):
    if kind in write.ENTRY_WRITERS:
        return JsonlKind(kind, image_root, skip_missing)
    return {"webdataset": TarKind, "parquet": ParquetKind}[kind]()


KINDS = sorted(write.ENTRY_WRITERS) + ["parquet", "webdataset"]


class ReadFile(beam.DoFn):
    """path -> (path, position, item); a file that stops reading gives a reject naming where."""

    def __init__(self, source):
        self.source = source

    def process(self, path: str):
        position = 0
        try:
            for position, item in self.source.read(path):
                yield path, position, item
        except Exception as e:  # noqa: BLE001  (whatever the format's reader raises for a broken file)
            yield path, position + 1, records.Unreadable(f"{path}: stops reading after item {position}: {e}")


class ToDocument(beam.DoFn):
    """(path, position, item) -> (shard, ((path, position), encoded document)), or a reject."""
    REJECTS = "rejects"

    def __init__(self, source, num_shards: int):
        self.source, self.num_shards = source, num_shards

    def process(self, element):
        path, position, item = element
        where = self.source.where(path, position)
        counts: collections.Counter = collections.Counter()
        try:
            encoded = item if isinstance(item, records.Unreadable) else self.source.document(path, item, where, counts)
            if encoded is None:
                return
            if isinstance(encoded, records.Unreadable):
                raise records.SourceError(encoded.reason, encoded.kind)
            document = records.decode(encoded)
        except (records.SourceError, records.RecordError) as e:
            Metrics.counter(NAMESPACE, f"rejected_{e.kind}").inc()
            yield beam.pvalue.TaggedOutput(self.REJECTS, json.dumps({"where": where, "kind": e.kind, "error": str(e)}))
            return
        counts["documents"] += 1
        for segment in document["segments"]:
            counts[records.segment_kind(segment) + "_segments"] += 1
        for name, value in counts.items():
            Metrics.counter(NAMESPACE, name).inc(value)
        yield zlib.crc32(where.encode()) % self.num_shards, ((path, position), encoded)


class WriteShard(beam.DoFn):
    """(shard, [(key, encoded) or None]) -> the shard's path, written atomically (hidden name, then
    renamed); an existing shard is kept."""

    def __init__(self, output: str, num_shards: int):
        self.output, self.num_shards = output, num_shards

    def process(self, element):
        from array_record.python.array_record_module import ArrayRecordWriter
        shard, items = element
        path = shard_path(self.output, shard, self.num_shards)
        if os.path.exists(path):
            Metrics.counter(NAMESPACE, "shards_already_written").inc()
            yield path
            return
        temporary = records.temporary_path(path)
        writer = ArrayRecordWriter(temporary, "group_size:1")  # truncates what a killed job left there
        for _, encoded in sorted(item for item in items if item is not None):
            writer.write(encoded)
        writer.close()
        os.replace(temporary, path)
        Metrics.counter(NAMESPACE, "shards_written").inc()
        yield path


def build(pipeline, kind: str, input_pattern: str, output: str, *, num_shards: int, image_root: str | None = None,
          skip_missing: bool = False):
    """Adds the conversion to `pipeline`; returns the PCollection of written shard paths."""
    source = input_kind(kind, image_root, skip_missing)
    paths = sorted(m.path for m in FileSystems.match([input_pattern])[0].metadata_list)
    if not paths:
        raise records.SourceError(f"{input_pattern}: no input file matches")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    items = pipeline | "files" >> beam.Create(paths) | "read" >> beam.ParDo(ReadFile(source))
    if source.spread:
        items = items | "spread" >> beam.Reshuffle()
    converted = items | "convert" >> beam.ParDo(ToDocument(source, num_shards)).with_outputs(
        ToDocument.REJECTS, main="documents")
    (converted[ToDocument.REJECTS]
     | "rejects" >> beam.io.WriteToText(output + "-rejects", file_name_suffix=".jsonl", shard_name_template=""))
    every_shard = pipeline | "shards" >> beam.Create([(i, None) for i in range(num_shards)])  # empty ones too
    return ((converted.documents, every_shard)
            | "join" >> beam.Flatten()
            | "by shard" >> beam.GroupByKey()
            | "write" >> beam.ParDo(WriteShard(output, num_shards)))


def counters(result) -> dict[str, int]:
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
            if c.key.metric.namespace == NAMESPACE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--input", required=True, help="JSONL files, tar shards or Parquet files: a path or glob "
                        "anywhere Beam reads.")
    parser.add_argument("--output", required=True, help="Shard prefix: PREFIX-00000-of-0000N.array_record.")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--image_root", default=None, help="Folder JSONL paths are relative to (default: each file's).")
    parser.add_argument("--skip_missing", action="store_true", help="mmc4: drop missing images, and count them.")
    args, beam_args = parser.parse_known_args(argv)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
            build(pipeline, args.kind, args.input, args.output, num_shards=args.num_shards,
                  image_root=args.image_root, skip_missing=args.skip_missing)
    except records.SourceError as e:
        sys.exit(f"error: {e}")
    for name, value in sorted(counters(pipeline.result).items()):
        print(f"{name}: {value}")
    print("\n".join(shard_path(args.output, i, args.num_shards) for i in range(args.num_shards)))
    return 0


if __name__ == "__main__":
    main()

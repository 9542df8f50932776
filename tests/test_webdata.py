"""Web-scale sources read directly (emu_jax/data/webdata.py): webdataset tar shards in img2dataset's
layout and Parquet files (img2dataset's, OBELICS' interleaved rows), made from real photos; the
documents they give, their bad samples counted, and a restored iterator continuing exactly."""
import io
import json
import tarfile

import numpy as np
import pytest
from absl import flags
from PIL import Image
from test_data import VISUAL, assert_resumes_exactly, tiny_config

from emu_jax import config_lib
from emu_jax.data import media, pipeline, records, webdata
from emu_jax.data.records import RecordError

flags.FLAGS.mark_as_parsed()
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse")


def photo(name: str, size: int = 48) -> bytes:
    from skimage import data
    pixels = getattr(data, name)()
    pixels = np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).resize((size, size)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two img2dataset-style shards: six photo samples (captions in .txt, or in .json for one),
    then a sample without a caption and one whose JPEG is cut short."""
    folder = tmp_path_factory.mktemp("wds")
    samples = [(f"{i:05d}", photo(name), f"a photo of a {name}") for i, name in enumerate(PHOTOS)]
    first = [m for key, jpg, text in samples[:3] for m in ((f"{key}.jpg", jpg), (f"{key}.txt", text.encode()))]
    second = [(f"{samples[3][0]}.jpg", samples[3][1]),
              (f"{samples[3][0]}.json", json.dumps({"caption": samples[3][2], "status": "success"}).encode())]
    second += [m for key, jpg, text in samples[4:] for m in ((f"{key}.jpg", jpg), (f"{key}.txt", text.encode()))]
    second += [("00006.jpg", photo("astronaut")), ("00007.jpg", photo("coffee")[:300]), ("00007.txt", b"cut short")]
    write_tar(folder / "shard-00000.tar", first)
    write_tar(folder / "shard-00001.tar", second)
    return folder, samples


def documents_of(reader):
    return [records.decode(reader[i]) for i in range(len(reader))]


def test_tar_shards_read_as_documents_with_bad_samples_named(shards):
    folder, samples = shards
    sizes = webdata.tar_shard_sizes(str(folder / "shard-{00000..00001}.tar"), strict=False)
    assert list(sizes.values()) == [3, 5]
    reader = webdata.TarShards(sizes)
    docs = [records.decode(reader[i]) for i in range(6)]
    assert [d["segments"][1]["text"] for d in docs] == [text for _, _, text in samples]
    first_pixels = media.decode_image(docs[0]["segments"][0]["image"], 48)
    assert np.array_equal(first_pixels, media.decode_image(samples[0][1], 48))
    with pytest.raises(RecordError, match=r"shard-00001.tar sample 3: sample '00006' has no caption") as missing:
        records.decode(reader[6])
    assert missing.value.kind == "malformed"


def test_webdataset_and_parquet_sources_count_bad_samples_and_resume_exactly(shards, tmp_path, digits_world):
    """Through the training pipeline (worker processes): every good sample arrives, the captionless one is counted as
    malformed and the cut JPEG as bad_image (strict mode names the first), and an iterator restored
    from its state gives the same following batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder, samples = shards
    rows = samples * 10  # many small row groups: worker threads reading one file at once
    pq.write_table(pa.table({"jpg": [jpg for _, jpg, _ in rows], "caption": [t for _, _, t in rows],
                             "key": [k for k, _, _ in rows]}), tmp_path / "part-0.parquet", row_group_size=3)
    data_dir = digits_world  # its tokenizer
    for source in (config_lib.source("webdataset", str(folder / "shard-*.tar")),
                   config_lib.source("parquet", str(tmp_path / "*.parquet"))):
        config = tiny_config(data_dir, global_batch_size=1, eval_sources={"web": source})
        # two worker processes, each reading with several threads (a Parquet reader shared by threads crashed)
        batches = list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=2))
        events = sum(b["events"].sum(0) for b in batches)
        bad = 2 if source.kind == "webdataset" else 0
        assert sum(b["image_mask"].sum() for b in batches) == (6 if source.kind == "webdataset" else 60), source.kind
        assert events[pipeline.EVENTS.index("malformed")] == bad // 2 and events[pipeline.EVENTS.index(
            "bad_image")] == bad // 2, source.kind

        assert_resumes_exactly(tiny_config(data_dir, global_batch_size=2, train_sources={"web": source}), then=4)

    config = tiny_config(data_dir, global_batch_size=1, strict=True, eval_sources={
        "web": config_lib.source("webdataset", str(folder / "shard-*.tar"))})
    with pytest.raises(RecordError, match=r"sample '00006' has no caption"):
        list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))


def test_obelics_rows_become_interleaved_documents_and_paths_are_read(tmp_path):
    """An OBELICS row (texts / images lists, one item per position) and an img2dataset row whose
    image is a path beside the file; a row with neither image nor caption, a path that is not there."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.jpg").write_bytes(photo("chelsea"))
    pq.write_table(pa.table({"texts": [["A cat.", None, "It sleeps."], [None]],
                             "images": [[None, photo("chelsea"), None], [None]]}), tmp_path / "obelics.parquet")
    pq.write_table(pa.table({"image": ["img/cat.jpg", "img/none.jpg"], "caption": ["a cat", "gone"]}),
                   tmp_path / "paths.parquet")
    reader = webdata.ParquetRows(webdata.parquet_sizes(str(tmp_path / "*.parquet"), strict=False))
    obelics = records.decode(reader[0])["segments"]
    assert [records.segment_kind(s) for s in obelics] == ["text", "image", "text"]
    with pytest.raises(RecordError, match=r"obelics.parquet row 1: interleaved row with no text and no image"):
        records.decode(reader[1])
    from_path = records.decode(reader[2])["segments"]
    assert from_path[0]["image"] == photo("chelsea") and from_path[1]["text"] == "a cat"
    with pytest.raises(RecordError, match=r"paths.parquet row 1: cannot read .*none.jpg") as missing:
        records.decode(reader[3])
    assert missing.value.kind == "missing_image"


def test_training_shuffles_parquet_by_row_group_so_each_group_is_decoded_once(tmp_path, monkeypatch):
    """An epoch of 60 rows in 10 row groups: every row once, not in file order, and 10 row-group
    decodes (a record-level shuffle decoded a group for nearly every row); the next epoch differs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"jpg": [photo("coffee")] * 60, "caption": [f"row {i}" for i in range(60)]}),
                   tmp_path / "rows.parquet", row_group_size=6)
    decoded = []
    read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: decoded.append(i) or read(self, i, **kw))
    data = config_lib.data_config(train_sources={"rows": config_lib.source("parquet", str(tmp_path / "*.parquet"))})
    ds = pipeline.mixture(data, data.train_sources, shuffle=True)
    captions = [records.decode(ds[i][2])["segments"][1]["text"] for i in range(120)]
    epoch, next_epoch = captions[:60], captions[60:]
    assert sorted(epoch) == sorted(f"row {i}" for i in range(60)) and epoch != [f"row {i}" for i in range(60)]
    assert sorted(decoded[:10]) == list(range(10)) and len(decoded) <= 20 and next_epoch != epoch


def test_streamed_tar_shards_read_every_sample_once_per_host_count_bad_ones_and_resume_mid_shard(
        shards, tmp_path, digits_world):
    """kind=webdataset_stream reads the shards front to back (no index): one pass gives the indexed
    reader's documents, split over two hosts by shard with nothing read twice; a captionless sample
    and a cut JPEG are counted, a shard cut off in the middle ends with one `unreadable` and the
    samples before it; training (window shuffle, repeated, two worker processes) resumes exactly."""
    folder, samples = shards
    stream = config_lib.source("webdataset_stream", str(folder / "shard-*.tar"))

    def read(process_index, process_count):
        config = tiny_config(digits_world, eval_sources={"web": stream})
        return [(where, record) for _, where, record in pipeline.stream_mixture(
            config.data, config.data.eval_sources, shuffle=False, process_index=process_index,
            process_count=process_count)]

    def keys(process_index, process_count):
        return [(where, record.kind if isinstance(record, records.Unreadable) else records.decode(record)["meta"]["key"])
                for where, record in read(process_index, process_count)]
    indexed = webdata.TarShards(webdata.tar_shard_sizes(str(folder / "shard-*.tar"), strict=False))
    assert sorted(r for _, r in read(0, 1) if isinstance(r, bytes)) == sorted(
        indexed[i] for i in range(len(indexed)) if isinstance(indexed[i], bytes))  # the same documents
    alone = keys(0, 1)
    assert sorted(key for _, key in alone) == sorted([key for key, _, _ in samples] + ["00007", "malformed"])
    first, second = keys(0, 2), keys(1, 2)
    assert sorted(map(str, first + second)) == sorted(map(str, alone)) and not set(map(str, first)) & set(map(str, second))
    assert all("shard-00000" in where for where, _ in first) and all("shard-00001" in where for where, _ in second)

    config = tiny_config(digits_world, global_batch_size=1, eval_sources={"web": stream})
    batches = list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))
    events = sum(b["events"].sum(0) for b in batches)
    assert sum(b["image_mask"].sum() for b in batches) == 6
    assert events[pipeline.EVENTS.index("malformed")] == 1 and events[pipeline.EVENTS.index("bad_image")] == 1

    config = tiny_config(digits_world, global_batch_size=1, strict=True, eval_sources={"web": stream})
    with pytest.raises(RecordError, match=r"shard-00001.tar sample 3: sample '00006' has no caption"):
        list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))

    cut = tmp_path / "cut-00000.tar"
    with tarfile.open(folder / "shard-00001.tar") as tar:
        inside = next(m for m in tar.getmembers() if m.name == "00005.jpg").offset_data + 100
    cut.write_bytes((folder / "shard-00001.tar").read_bytes()[:inside])  # a download that stopped in 00005.jpg
    config = tiny_config(digits_world, global_batch_size=1, eval_sources={
        "web": config_lib.source("webdataset_stream", str(cut))})
    batches = list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))
    events = sum(b["events"].sum(0) for b in batches)
    assert events[pipeline.EVENTS.index("unreadable")] == 1 and sum(b["image_mask"].sum() for b in batches) == 2

    train = tiny_config(digits_world, global_batch_size=2, train_sources={"web": stream})
    with train.unlocked():
        train.data.stream.shuffle_window = 4
    assert_resumes_exactly(train, workers=2, read=5, then=4)
    wide = tiny_config(digits_world, global_batch_size=2, train_sources={"web": stream})  # one window: 1000 samples
    make = lambda: iter(pipeline.make_dataset(wide.data, wide.model, VISUAL, worker_count=0))  # noqa: E731
    straight, once = make(), make()
    for _ in range(3):
        next(straight)
    once.set_state(straight.get_state())
    for _ in range(3):  # restored once, then checkpointed again: a second restore must read on the same
        next(straight), next(once)
    assert once.get_state() == straight.get_state()
    mixed = tiny_config(digits_world, global_batch_size=2, train_sources={
        "web": stream, "digits": config_lib.source("digits", "{data_dir}", "train", weight=0.5)})
    assert_resumes_exactly(mixed, read=3, then=3)
    with pytest.raises(ValueError, match="'web': webdataset_stream is read front to back"):
        pipeline.documents(train.data, train.data.train_sources, shuffle=False, process_index=0, process_count=1)

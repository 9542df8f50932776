"""The Beam conversion (`emu_jax.data.beam_write`) on the DirectRunner, in the environment of its own
that `requirements-beam.txt` describes (Beam's pins clash with this package's locked ones): built
once per machine, as a user builds it, and reused while that file is unchanged."""
import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT
import test_webdata
from test_webdata import PHOTOS, photo

from emu_jax.data import records, webdata, write

pytestmark = pytest.mark.slow
shards = test_webdata.shards  # the fixture: two img2dataset-style tar shards of photos
REQUIREMENTS = ROOT / "requirements-beam.txt"


@pytest.fixture(scope="session")
def beam_python() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    env = pathlib.Path.home() / ".cache" / "emu_jax" / f"beam-env-{digest}"
    python = env / "bin" / "python"
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{env}.lock", "w") as lock:  # pytest-xdist workers build it once between them
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / "ready").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
            (env / "ready").touch()
    return str(python)


def run_beam(beam_python, *args, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m emu_jax.data.beam_write ARGS` in the Beam environment (this checkout on its path);
    `prelude` runs first in the same process (the DirectRunner runs the DoFns in it)."""
    code = prelude + f"\nfrom emu_jax.data import beam_write\nbeam_write.main({list(args)!r})\n"
    return subprocess.run([beam_python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def shard_records(paths) -> list[bytes]:
    reader = records.ShardReader({str(p): records.count_records(str(p)) for p in paths})
    return [reader[i] for i in range(len(reader))]


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    """Image-caption pairs of photos, and four bad lines between them: not JSON, not UTF-8, no
    caption, an image file that does not exist."""
    folder = tmp_path_factory.mktemp("beam")
    good = []
    for i, name in enumerate(PHOTOS):
        (folder / f"{name}.jpg").write_bytes(photo(name))
        good.append(json.dumps({"image": f"{name}.jpg", "caption": f"a photo of a {name}"}).encode())
    bad = [b"{not json", b"\xff\xfe caption", json.dumps({"image": "coffee.jpg"}).encode(),
           json.dumps({"image": "missing.jpg", "caption": "gone"}).encode()]
    lines = good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]
    (folder / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "good.jsonl").write_bytes(b"\n".join(good) + b"\n")
    return folder


def test_beam_conversion_equals_the_direct_writer_record_for_record_and_rejects_bad_lines(beam_python, pairs_jsonl):
    folder = pairs_jsonl
    direct, _ = write.convert("pairs", str(folder / "good.jsonl"), str(folder / "direct" / "pairs"))
    expected = shard_records(direct)
    assert len(expected) == len(PHOTOS)

    one = run_beam(beam_python, "pairs", f"--input={folder}/pairs.jsonl", f"--output={folder}/one/pairs")
    assert one.returncode == 0, one.stderr[-3000:]
    assert shard_records([folder / "one" / "pairs-00000-of-00001.array_record"]) == expected  # in line order
    metrics = dict(line.split(": ") for line in one.stdout.splitlines() if ": " in line)
    assert metrics["documents"] == str(len(PHOTOS)) and metrics["image_segments"] == str(len(PHOTOS))
    assert {k: v for k, v in metrics.items() if k.startswith("rejected_")} == {
        "rejected_not_json": "1", "rejected_not_utf8": "1", "rejected_missing_field": "1",
        "rejected_unreadable_file": "1"}
    rejects = sorted((json.loads(line) for line in (folder / "one" / "pairs-rejects.jsonl").read_text().splitlines()),
                     key=lambda r: r["where"])
    assert [(r["where"], r["kind"]) for r in rejects] == [
        (f"{folder}/pairs.jsonl:3", "not_json"), (f"{folder}/pairs.jsonl:4", "not_utf8"),
        (f"{folder}/pairs.jsonl:7", "missing_field"), (f"{folder}/pairs.jsonl:8", "unreadable_file")]
    assert "missing.jpg" in rejects[3]["error"]

    three = run_beam(beam_python, "pairs", f"--input={folder}/pairs.jsonl", f"--output={folder}/three/pairs",
                     "--num_shards=3", "--direct_num_workers=2", "--direct_running_mode=multi_threading")
    assert three.returncode == 0, three.stderr[-3000:]
    shards = sorted((folder / "three").glob("pairs-*-of-00003.array_record"))
    assert len(shards) == 3 and sorted(shard_records(shards)) == sorted(expected)


KILL_AT_THIRD_SHARD = """
import os, signal
rename, renamed = os.replace, []
def replace_then_die(src, dst):  # the job is killed as it is about to publish its third shard
    if str(dst).endswith(".array_record"):
        renamed.append(dst)
        if len(renamed) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.replace = replace_then_die
"""


def test_a_killed_beam_job_rerun_finishes_with_the_same_shards(beam_python, pairs_jsonl):
    folder = pairs_jsonl
    args = ("pairs", f"--input={folder}/pairs.jsonl", "--num_shards=5")
    whole = run_beam(beam_python, *args, f"--output={folder}/whole/pairs")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = run_beam(beam_python, *args, f"--output={folder}/killed/pairs", prelude=KILL_AT_THIRD_SHARD)
    assert killed.returncode == -9
    published = sorted(p.name for p in (folder / "killed").glob("pairs-*.array_record"))
    left_behind = sorted(p.name for p in (folder / "killed").glob(".pairs-*.tmp"))
    assert len(published) == 2 and len(left_behind) == 1  # the third shard, complete but never published

    rerun = run_beam(beam_python, *args, f"--output={folder}/killed/pairs")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "shards_already_written: 2" in rerun.stdout and "shards_written: 3" in rerun.stdout
    names = [f"pairs-{i:05d}-of-00005.array_record" for i in range(5)]
    for name in names:
        assert (folder / "killed" / name).read_bytes() == (folder / "whole" / name).read_bytes(), name
    assert not list((folder / "killed").glob(".pairs-*.tmp"))


def test_tar_shards_and_parquet_convert_as_the_pipeline_reads_them(beam_python, shards, tmp_path):
    """webdataset shards (a sample without a caption among them) and an OBELICS-style Parquet file
    (a row with neither text nor image): the Beam conversion holds exactly the documents the
    pipeline's direct readers give, in their order; what they refuse is rejected and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder, _ = shards
    tar_reader = webdata.TarShards(webdata.tar_shard_sizes(str(folder / "*.tar"), strict=True))
    pq.write_table(pa.table({"texts": [["a cat", None, "sleeps"], [None], ["a rocket", None]],
                             "images": [[None, photo("chelsea"), None], [None], [None, photo("rocket")]]}),
                   tmp_path / "obelics.parquet", row_group_size=2)
    parquet_reader = webdata.ParquetRows(webdata.parquet_sizes(str(tmp_path / "*.parquet"), strict=True))
    for kind, pattern, reader, rejected in (("webdataset", f"{folder}/*.tar", tar_reader, "shard-00001.tar sample 3"),
                                            ("parquet", f"{tmp_path}/*.parquet", parquet_reader, "obelics.parquet row 1")):
        direct = [reader[i] for i in range(len(reader))]
        done = run_beam(beam_python, kind, f"--input={pattern}", f"--output={tmp_path}/{kind}/out")
        assert done.returncode == 0, done.stderr[-3000:]
        converted = shard_records([tmp_path / kind / "out-00000-of-00001.array_record"])
        assert converted == [r for r in direct if not isinstance(r, records.Unreadable)]
        assert "rejected_malformed: 1" in done.stdout
        [reject] = [json.loads(line) for line in (tmp_path / kind / "out-rejects.jsonl").read_text().splitlines()]
        assert reject["where"].endswith(rejected) and reject["kind"] == "malformed"

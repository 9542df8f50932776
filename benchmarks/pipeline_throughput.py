"""Records/s of the full input pipeline beside raw PIL decode + resize of the same images, in one run.

    pip install scikit-image   # real sample photos
    python benchmarks/pipeline_throughput.py [--records=3000] [--workers=2] [--image_size=224]

Writes image-caption pairs of scikit-image's sample photos (re-encoded as JPEG at up to 512 px,
as web-scale pairs arrive) as an ArrayRecord shard, webdataset tar shards (img2dataset's layout)
and a Parquet file (img2dataset's columns), then measures
  raw:      PIL decode + bicubic resize of every record's image (`Image.open(...).convert("RGB")
            .resize(...)`), one process
  pipeline: the whole Grain pipeline (read, decode, tokenise, pack, loss masks, batch) with N
            workers from each source, steady state (after the first batches, which include
            starting the workers)
and prints each and its ratio to raw (target >= 1.6 at 2 workers on 2 cores: the pipeline decodes
large JPEGs in draft mode, see media.decode_image). Parquet reads whole row groups (here 100 rows),
which each worker decodes for its share of them.
"""
from __future__ import annotations

import io
import os
import tempfile
import time

from absl import app, flags
from PIL import Image

from emu_jax import config_lib
from emu_jax.data import digits, pipeline, records

flags.DEFINE_integer("records", 3000, "Records to write and read (enough that the steady state, not the "
                     "workers' start and the prefetch buffers, decides the rate).")
flags.DEFINE_integer("workers", 2, "Grain worker processes.")
flags.DEFINE_integer("image_size", 224, "Model image size.")
FLAGS = flags.FLAGS


def sample_photos() -> list[bytes]:
    import skimage
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    photos = []
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
                 "hubble_deep_field.jpg", "retina.jpg", "camera.png", "moon.png"):
        with Image.open(os.path.join(folder, name)) as img:
            img = img.convert("RGB")
            img.thumbnail((512, 512))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=90)
            photos.append(buffer.getvalue())
    return photos


def main(argv):
    del argv
    photos = sample_photos()
    workdir = tempfile.mkdtemp()
    data_dir = os.path.join(workdir, "datasets")
    digits.build(data_dir)  # for its tokenizer
    pairs = [(photos[i % len(photos)], f"a photo number {i}") for i in range(FLAGS.records)]
    sources = write_sources(workdir, pairs)

    start = time.perf_counter()
    for jpg, _ in pairs:
        with Image.open(io.BytesIO(jpg)) as img:
            img.convert("RGB").resize((FLAGS.image_size, FLAGS.image_size), Image.BICUBIC)
    raw = FLAGS.records / (time.perf_counter() - start)
    print(f"raw PIL decode+resize ({FLAGS.image_size}px, 1 process): {raw:8.1f} records/s")

    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    for kind, path in sources.items():
        with config.unlocked():
            config.model.vit.image_size = FLAGS.image_size
            config.data.data_dir = data_dir
            config.data.global_batch_size = 8
            config.data.eval_sources = {"photos": config_lib.source(kind, path)}
        piped = pipeline_rate(config)
        print(f"full pipeline, {kind:12s} ({FLAGS.workers} workers): {piped:8.1f} records/s   "
              f"ratio pipeline / raw: {piped / raw:.2f}")


def write_sources(workdir: str, pairs: list[tuple[bytes, str]]) -> dict[str, str]:
    """The pairs as an ArrayRecord shard, two webdataset tar shards and a Parquet file."""
    import tarfile
    import pyarrow as pa
    import pyarrow.parquet as pq
    prefix = os.path.join(workdir, "photos")
    records.write_shards(prefix, [records.document([records.image(jpg), records.text(text)]) for jpg, text in pairs])
    half = len(pairs) // 2
    for shard, part in enumerate((pairs[:half], pairs[half:])):
        with tarfile.open(os.path.join(workdir, f"photos-{shard:05d}.tar"), "w") as tar:
            for i, (jpg, text) in enumerate(part):
                for suffix, data in (("jpg", jpg), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"jpg": [jpg for jpg, _ in pairs], "caption": [text for _, text in pairs]}),
                   os.path.join(workdir, "photos.parquet"), row_group_size=100)
    return {"array_record": prefix + "-*", "webdataset": os.path.join(workdir, "photos-{00000..00001}.tar"),
            "parquet": os.path.join(workdir, "photos.parquet")}


def pipeline_rate(config) -> float:
    ds = pipeline.make_dataset(config.data, config.model, 4, split="eval", worker_count=FLAGS.workers)
    it = iter(ds)
    warmup = 8
    for _ in range(warmup):
        next(it)
    start, count = time.perf_counter(), 0
    for batch in it:
        count += int((batch["image_mask"]).sum())  # one image per record
    return count / (time.perf_counter() - start)


if __name__ == "__main__":
    app.run(main)

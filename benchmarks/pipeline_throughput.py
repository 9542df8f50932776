"""Records/s of the full input pipeline beside raw PIL decode + resize of the same images, in one run.

    pip install scikit-image   # real sample photos
    python benchmarks/pipeline_throughput.py [--records=600] [--workers=2] [--image_size=224]

Writes image-caption records of scikit-image's sample photos (re-encoded as JPEG at up to 512 px,
as web-scale pairs arrive) to an ArrayRecord shard, then measures
  raw:      PIL decode + bicubic resize of every record's image, one process
  pipeline: the whole Grain pipeline (decode, tokenise, pack, loss masks, batch) with N workers,
            steady state (after the first batches, which include starting the workers)
and prints both and their ratio (target >= 0.9 at 2 workers).
"""
from __future__ import annotations

import io
import os
import tempfile
import time

from absl import app, flags
from PIL import Image

from emu_jax import config_lib
from emu_jax.data import digits, media, pipeline, records

flags.DEFINE_integer("records", 600, "Records to write and read.")
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
    prefix = os.path.join(workdir, "photos")
    docs = [records.document([records.image(photos[i % len(photos)]), records.text(f"a photo number {i}")])
            for i in range(FLAGS.records)]
    records.write_shards(prefix, docs)

    start = time.perf_counter()
    for doc in docs:
        media.decode_image(doc["segments"][0]["image"], FLAGS.image_size)
    raw = FLAGS.records / (time.perf_counter() - start)

    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    with config.unlocked():
        config.model.vit.image_size = FLAGS.image_size
        config.data.data_dir = data_dir
        config.data.global_batch_size = 8
        config.data.eval_sources = {"photos": config_lib.source("array_record", prefix + "-*")}
    ds = pipeline.make_dataset(config.data, config.model, 4, split="eval", worker_count=FLAGS.workers)
    it = iter(ds)
    warmup = 8
    for _ in range(warmup):
        next(it)
    start, count = time.perf_counter(), 0
    for batch in it:
        count += int((batch["image_mask"]).sum())  # one image per record
    piped = count / (time.perf_counter() - start)
    print(f"raw PIL decode+resize ({FLAGS.image_size}px, 1 process): {raw:8.1f} records/s")
    print(f"full pipeline ({FLAGS.workers} workers):              {piped:8.1f} records/s")
    print(f"ratio pipeline / raw: {piped / raw:.2f}")


if __name__ == "__main__":
    app.run(main)

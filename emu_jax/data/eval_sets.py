"""TFDS builders for the evaluation sets the Emu papers report, read from a user's `manual_dir`.

COCO captions, Karpathy split — manual_dir holds `dataset_coco.json` (Karpathy's split file) and
the image folders it names (`val2014/`, `train2014/`):

    python -m emu_jax.data.eval_sets coco_karpathy --manual_dir=/data/coco --data_dir=~/tensorflow_datasets

VQAv2 — manual_dir holds the official `v2_OpenEnded_mscoco_{train,val}2014_questions.json`,
`v2_mscoco_{train,val}2014_annotations.json` and `{train,val}2014/` image folders:

    python -m emu_jax.data.eval_sets vqav2 --manual_dir=/data/vqav2 --data_dir=~/tensorflow_datasets

Every example carries the raw `image` bytes, its ids and references, and a `document` (the
image followed by its caption / question and answer) so the same split can also be trained on.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from absl import app, flags

from emu_jax.data import records
from emu_jax.files import read_json

VQA_SPLITS = {"train": "train2014", "validation": "val2014"}


def karpathy_examples(manual_dir: str, split: str):
    """Karpathy's `restval` belongs to train, as in the published splits."""
    wanted = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}[split]
    for entry in read_json(os.path.join(manual_dir, "dataset_coco.json"))["images"]:
        if entry["split"] not in wanted:
            continue
        path = os.path.join(manual_dir, entry["filepath"], entry["filename"])
        image = records.read_source(path, f"cocoid {entry['cocoid']}")
        captions = [s["raw"].strip() for s in entry["sentences"]]
        doc = records.document([records.image(image), records.text(captions[0])], "coco", cocoid=entry["cocoid"])
        yield entry["cocoid"], {"image": image, "image_id": entry["cocoid"], "captions": captions,
                                "document": records.encode(doc)}


def vqav2_examples(manual_dir: str, split: str):
    folder = VQA_SPLITS[split]
    questions = read_json(os.path.join(manual_dir, f"v2_OpenEnded_mscoco_{folder}_questions.json"))["questions"]
    annotations = {a["question_id"]: a for a in
                   read_json(os.path.join(manual_dir, f"v2_mscoco_{folder}_annotations.json"))["annotations"]}
    for q in questions:
        if q["question_id"] not in annotations:
            raise KeyError(f"question {q['question_id']} has no annotation in v2_mscoco_{folder}_annotations.json")
        a = annotations[q["question_id"]]
        image = records.read_source(os.path.join(manual_dir, folder, f"COCO_{folder}_{q['image_id']:012d}.jpg"),
                           f"question {q['question_id']}")
        text = f"question: {q['question']} answer: {a['multiple_choice_answer']}"
        doc = records.document([records.image(image), records.text(text)], "vqav2", question_id=q["question_id"])
        yield q["question_id"], {"image": image, "image_id": q["image_id"], "question_id": q["question_id"],
                                 "question": q["question"], "answers": [x["answer"] for x in a["answers"]],
                                 "answer_type": a.get("answer_type", ""), "document": records.encode(doc)}


@functools.cache  # TFDS registers a builder class by name when it is defined
def _builders():
    import tensorflow_datasets as tfds
    raw = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731

    class CocoKarpathy(tfds.core.GeneratorBasedBuilder):
        """COCO captions with Karpathy's train/val/test split."""
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Place dataset_coco.json and the COCO 2014 image folders in manual_dir."

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": raw(), "image_id": np.int64, "captions": tfds.features.Sequence(tfds.features.Text()),
                "document": raw()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(dl_manager.manual_dir, s) for s in ("train", "validation", "test")}

        def _generate_examples(self, manual_dir, split):
            yield from karpathy_examples(manual_dir, split)

    class Vqav2(tfds.core.GeneratorBasedBuilder):
        """VQAv2 questions with their ten human answers."""
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the official VQAv2 question/annotation JSONs and COCO images in manual_dir."

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": raw(), "image_id": np.int64, "question_id": np.int64, "question": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()), "answer_type": tfds.features.Text(),
                "document": raw()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(dl_manager.manual_dir, s) for s in VQA_SPLITS}

        def _generate_examples(self, manual_dir, split):
            yield from vqav2_examples(manual_dir, split)

    return {"coco_karpathy": CocoKarpathy, "vqav2": Vqav2}


def build(name: str, manual_dir: str, data_dir: str) -> str:
    """Prepares the dataset (array_record) and returns its directory."""
    import tensorflow_datasets as tfds
    builder = _builders()[name](data_dir=os.path.expanduser(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder.data_dir


def main(argv):
    if len(argv) != 2 or argv[1] not in ("coco_karpathy", "vqav2"):
        raise app.UsageError("usage: python -m emu_jax.data.eval_sets {coco_karpathy,vqav2} --manual_dir=DIR")
    print(build(argv[1], flags.FLAGS.manual_dir, flags.FLAGS.data_dir))


if __name__ == "__main__":
    flags.DEFINE_string("manual_dir", None, "Folder holding the dataset's original files.", required=True)
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where the TFDS dataset is written.")
    app.run(main)

"""Caption metrics as COCO reports them: pycocoevalcap's PTB tokenizer (Java), then BLEU-4, METEOR
(Java), ROUGE-L and CIDEr-D (pycocoevalcap's `Cider` is the CIDEr-D variant COCO reports).

Files: annotations in COCO caption format (`{"annotations": [{"image_id", "caption"}], ...}`, e.g.
the Karpathy test split) and results `[{"image_id", "caption"}]`, one caption per annotated image
and none for others. An unreadable or malformed file is an error naming the file and the entry; a
missing Java is a clear error.
"""
from __future__ import annotations

import shutil

from emu_jax.eval.vqa import MissingTool, check_id, read_entries, require_same_ids
from emu_jax.files import FormatError, read_json

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def load_references(path: str) -> dict:
    """{image_id: [captions]} from a COCO caption file."""
    data = read_json(path)
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise FormatError(f'{path}: expected a COCO caption file (an object with an "annotations" list)')
    refs: dict = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise FormatError(f"{path}: annotation {i} ({str(entry)[:80]}) needs image_id and a string caption")
        refs.setdefault(check_id(entry["image_id"], path, f"annotation {i}", "image_id"), []).append(entry["caption"])
    return refs


def load_captions(path: str) -> dict:
    """{image_id: caption} from a COCO result file."""
    return {i: e["caption"] for i, e in read_entries(path, None, "image_id", strings=("caption",)).items()}


def require_java() -> None:
    if shutil.which("java") is None:
        raise MissingTool("caption metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run java; "
                          "install a JRE (e.g. apt-get install default-jre-headless)")


def score_captions(predictions: dict, references: dict, metrics=METRICS) -> dict:
    """{metric: value} for {image_id: caption} against {image_id: [captions]} over the referenced
    images (every one needs a prediction); values as COCO prints them (fractions, not percentages)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    missing = [i for i in references if i not in predictions]
    if missing:
        raise FormatError(f"no caption for image_id {missing[0]} ({len(missing)} of {len(references)} missing)")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    scorers = {"BLEU-4": lambda: Bleu(4), "METEOR": Meteor, "ROUGE-L": Rouge, "CIDEr": Cider}
    out = {}
    for name in metrics:
        value, _ = scorers[name]().compute_score(gts, res)
        out[name] = float(value[3] if name == "BLEU-4" else value)
    return out


def score_caption_files(results_path: str, annotations_path: str) -> dict:
    predictions, references = load_captions(results_path), load_references(annotations_path)
    require_same_ids(results_path, predictions, annotations_path, references, "image_id")
    return score_captions(predictions, references)

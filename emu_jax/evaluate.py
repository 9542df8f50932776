"""Evaluation sweeps and scoring of official result files.

    python -m emu_jax.evaluate --config=configs/eval/digits.py [--config.out=DIR]
    python -m emu_jax.evaluate score --task=vqa --predictions=P.json --annotations=A.json [--questions=Q.json]

The first runs a sweep (checkpoints x tasks x shots x decoding settings; see emu_jax/eval/sweep.py):
finished cells are read back, so re-running a killed sweep resumes it; prints the results table and
writes results.csv, results.md and plots under the config's `out`. The second scores an existing
official-format result file (`caption`: COCO captions, CIDEr-D/BLEU-4/METEOR/ROUGE-L; `vqa`: the
official VQA accuracy, as a percentage; `videoqa`: exact match after the same normalisation) and
prints `<metric>: <value>` lines.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "The sweep config (configs/eval/<sweep>.py).", lock_config=True)
flags.DEFINE_enum("task", None, ["caption", "vqa", "videoqa"], "score: the kind of result file.")
flags.DEFINE_string("predictions", None, "score: the official-format result JSON.")
flags.DEFINE_string("annotations", None, "score: the annotation JSON.")
flags.DEFINE_string("questions", None, "score (vqa): the question JSON, to check the annotations against.")
FLAGS = flags.FLAGS


def score(task: str, predictions: str, annotations: str, questions: str | None = None) -> dict:
    from emu_jax.eval import caption_metrics, vqa
    if task == "caption":
        return caption_metrics.score_caption_files(predictions, annotations)
    if task == "vqa":
        return vqa.score_vqa(predictions, annotations, questions)
    return vqa.score_video_qa(predictions, annotations)


def main(argv):
    from emu_jax.eval.vqa import FormatError
    if argv[1:] == ["score"]:
        if not (FLAGS.task and FLAGS.predictions and FLAGS.annotations):
            sys.exit("score needs --task, --predictions and --annotations")
        try:
            metrics = score(FLAGS.task, FLAGS.predictions, FLAGS.annotations, FLAGS.questions)
        except FormatError as e:
            sys.exit(f"error: {e}")
        for name, value in metrics.items():
            print(f"{name}: {value:.2f}" if FLAGS.task != "caption" else f"{name}: {value:.4f}")
        return
    if argv[1:]:
        sys.exit(f"unknown command {argv[1:]}; use `score` or no command with --config")
    if FLAGS.config is None:
        sys.exit("a sweep needs --config=configs/eval/<sweep>.py")
    from emu_jax.eval import sweep
    sweep.run(FLAGS.config)
    print(open(os.path.join(FLAGS.config.out, "results.md")).read())


if __name__ == "__main__":
    app.run(main)

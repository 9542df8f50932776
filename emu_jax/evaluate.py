"""Evaluation sweeps and scoring of official result files.

    python -m emu_jax.evaluate --config=configs/eval/digits.py [--config.out=DIR]
    python -m emu_jax.evaluate score --task=vqa --predictions=P.json --annotations=A.json [--questions=Q.json]
        [--rule=official|emu_release|emu_release_okvqa]

The first runs a sweep (checkpoints x tasks x shots x decoding settings; see emu_jax/eval/sweep.py):
finished cells are read back, so re-running a killed sweep resumes it; prints the results table and
writes results.csv, results.md and plots under the config's `out`. A grid that cannot run to its end
(a checkpoint, config or task file that is not there, an unknown option, a text-to-image task over a
checkpoint without a decoder) is refused before its first cell, in one line naming the entry. The second scores an existing
official-format result file (`caption`: COCO captions, CIDEr-D/BLEU-4/METEOR/ROUGE-L; `vqa`: VQA
accuracy as a percentage, by the official evaluation's rule or, with `--rule`, the variant the Emu
release scored VQAv2 or OKVQA with; `videoqa`: exact match after VQA normalisation) and prints
`<metric>: <value>` lines. The predictions must answer exactly the annotated ids; an unreadable or
malformed file is one line naming the file and the entry, and a non-zero exit.
"""
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from emu_jax.eval import caption_metrics, vqa

# task: (scorer of (predictions, annotations, questions, rule), printed format); questions and rule are VQA's
SCORERS = {
    "caption": (lambda predictions, annotations, questions, rule:
                caption_metrics.score_caption_files(predictions, annotations), "{:.4f}"),
    "vqa": (vqa.score_vqa, "{:.2f}"),
    "videoqa": (lambda predictions, annotations, questions, rule: vqa.score_video_qa(predictions, annotations),
                "{:.2f}"),
}

config_flags.DEFINE_config_file("config", None, "The sweep config (configs/eval/<sweep>.py).", lock_config=True)
flags.DEFINE_enum("task", None, list(SCORERS), "score: the kind of result file.")
flags.DEFINE_string("predictions", None, "score: the official-format result JSON.")
flags.DEFINE_string("annotations", None, "score: the annotation JSON.")
flags.DEFINE_string("questions", None, "score (vqa): the question JSON, to check the annotations against.")
flags.DEFINE_enum("rule", "official", list(vqa.RULES),
                  "score (vqa): official (GT-Vision-Lab's vqaEval.py), emu_release (the Emu release's VQAv2 "
                  "scorer) or emu_release_okvqa (its OKVQA scorer: stems answers, needs nltk).")
FLAGS = flags.FLAGS


def score_command() -> None:
    if not (FLAGS.task and FLAGS.predictions and FLAGS.annotations):
        sys.exit("score needs --task, --predictions and --annotations")
    if FLAGS.task != "vqa" and (FLAGS.questions or FLAGS.rule != "official"):
        sys.exit("--questions and --rule apply to --task=vqa only")
    scorer, value_format = SCORERS[FLAGS.task]
    try:
        metrics = scorer(FLAGS.predictions, FLAGS.annotations, FLAGS.questions, FLAGS.rule)
    except (vqa.FormatError, vqa.MissingTool) as e:
        sys.exit(f"error: {e}")
    for name, value in metrics.items():
        print(f"{name}: " + value_format.format(value))


def main(argv):
    if argv[1:] == ["score"]:
        score_command()
        return
    if argv[1:]:
        sys.exit(f"unknown command {argv[1:]}; use `score` or no command with --config")
    if FLAGS.config is None:
        sys.exit("a sweep needs --config=configs/eval/<sweep>.py")
    from emu_jax.eval import sweep, tasks
    from emu_jax.files import FormatError
    from emu_jax.parallel import mesh as mesh_lib
    mesh_lib.maybe_initialize_distributed(FLAGS.config)
    try:
        sweep.run(FLAGS.config)
    except (sweep.SweepConfigError, tasks.TaskConfigError, FormatError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")  # a config the sweep refuses before its first cell, or a task's file it cannot read
    if jax.process_index() == 0:
        print(open(os.path.join(FLAGS.config.out, "results.md")).read())


if __name__ == "__main__":
    app.run(main)

"""VQA accuracy against the evaluation code itself, per question, on seeded hostile answer sets:
GT-Vision-Lab's `vqaEval.py` and `vqa.py` (Python 2: run from a temporary copy with print calls
and tabs expanded, nothing else changed) for the `official` rule, and the Emu release's LAVIS copy
(`Emu1/mm_eval/datasets/vqa_tools`, Python 3, imported as it is) for `emu_release` (VQAEval, as
the release scores VQAv2) and `emu_release_okvqa` (OKVQAEval, as it scores OKVQA)."""
import importlib.util
import json
import pathlib
import random
import re

import pytest
from official import RELEASE, VQA

from emu_jax.eval import vqa

RELEASE_VQA_TOOLS = RELEASE / "Emu1" / "mm_eval" / "datasets" / "vqa_tools"

# Answers that exercise every step of the cleaning: case, punctuation next to spaces or not, periods
# in and out of numbers (and more than the official 32), digit,digit commas, number words, articles,
# contractions, whitespace inside and around, stems for OKVQA, empty answers.
POOL = ["2", "two", "Two", "2.", "two.", "TWO!", "yes", "Yes", "yes.", "Yes!", "no", "No.", "none", "0", "zero",
        "the cat", "a cat", "cat", "Cat.", "cats", "an apple", "apple", "apples", "Apple's", "isnt", "isn't",
        "Isnt", "dont", "don't", "cant", "can't", "1,000", "1000", "1, 000", "1,000.", "3.5", "3.5.", "3,5", ".5",
        "0.5", "red, white", "red white", "red-white", "red/white", "red & white", "red,white", "e.g. a dog",
        "U.S.A.", "usa", "u.s.a", "mr. smith", "10:30", "10", "ten", "Ten", "black and white", "(yes)", '"yes"',
        "yes?", "no!", "Running", "running", "runs", "run", "it's", "its", "Im", "I'm", "im", "oclock", "o'clock",
        "yall", "y'all", "...", "", "a", "the", "1,2,3", "one two three", "#1", "100%", "$5", "5 dollars",
        "wait" + "." * 40 + "what", "a.b." * 20, "in  two   words", "left ;right", "left;right", "[4]", "{x}",
        "x_y", "a+b", "a=b", "<3", "me@home", "`tick`", "back\\slash", "multi\nline", "tab\tbed"]
WRAPPERS = [lambda s: s, lambda s: s.upper(), lambda s: s.title(), lambda s: s + ".", lambda s: s + "!",
            lambda s: " " + s + " ", lambda s: s + "\n", lambda s: "\t" + s, lambda s: "the " + s,
            lambda s: "A " + s, lambda s: s + ",", lambda s: s.replace(" ", "  "), lambda s: s + "." * 36]


def hostile(rng: random.Random, base: str) -> str:
    return rng.choice(WRAPPERS)(base)


def human_answers(rng: random.Random) -> list[str]:
    """Ten answers (sometimes another count) that agree as written, agree only once stripped or
    normalised, or disagree."""
    count = rng.choice([10] * 8 + [1, 3, 5])
    base = rng.choice(POOL)
    kind = rng.choice(["identical", "whitespace", "variants", "two camps", "scattered"])
    if kind == "identical":
        return [base] * count
    if kind == "whitespace":
        return [rng.choice(["", " ", "\n", "\t"]) + base + rng.choice(["", " ", "\n"]) for _ in range(count)]
    if kind == "variants":
        return [hostile(rng, base) if rng.random() < 0.4 else base for _ in range(count)]
    if kind == "two camps":
        other = rng.choice(POOL)
        return [rng.choice([base, other, hostile(rng, other)]) for _ in range(count)]
    return [rng.choice(POOL) for _ in range(count)]


def answer_entries(rng: random.Random, answers: list[str]) -> list[dict]:
    """VQAv2's entries (answer_id, answer_confidence); sometimes none but the answer, so that equal
    entries are equal dicts, which the official tool leaves out together."""
    if rng.random() < 0.2:
        return [{"answer": a} for a in answers]
    return [{"answer": a, "answer_confidence": rng.choice(["yes", "maybe"]), "answer_id": i + 1}
            for i, a in enumerate(answers)]


def prediction(rng: random.Random, answers: list[str]) -> str:
    choice = rng.random()
    if choice < 0.3:
        return rng.choice(answers)
    if choice < 0.75:
        return hostile(rng, rng.choice(answers).strip())
    return hostile(rng, rng.choice(POOL))


def write_hostile_set(tmp: pathlib.Path, seed: int, count: int) -> dict:
    """Official annotation, question and result files for `count` hostile questions."""
    rng = random.Random(seed)
    annotations, questions, results = [], [], []
    for q in range(count):
        answers = human_answers(rng)
        question_id = 1000 + q
        annotations.append({"question_id": question_id, "image_id": q, "question_type": "what",
                            "answer_type": "other", "multiple_choice_answer": answers[0],
                            "answers": answer_entries(rng, answers)})
        questions.append({"question_id": question_id, "image_id": q, "question": f"question {q}?"})
        results.append({"question_id": question_id, "answer": prediction(rng, answers)})
    header = {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco"}
    files = {"annotations": {**header, "annotations": annotations},
             "questions": {**header, "task_type": "Open-Ended", "questions": questions}, "results": results}
    for name, value in files.items():
        (tmp / f"{name}.json").write_text(json.dumps(value))
    return {name: str(tmp / f"{name}.json") for name in files}


def import_file(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python3_copy(source: pathlib.Path, tmp: pathlib.Path, name: str):
    """The Python 2 file as a module: tabs expanded as Python 2 reads them (to multiples of 8) and
    `print x` statements as calls; nothing else touched."""
    text = re.sub(r"^(\s*)print (.+)$", r"\1print(\2)", source.read_text().expandtabs(8), flags=re.M)
    (tmp / f"{name}.py").write_text(text)
    return import_file(name, tmp / f"{name}.py")


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """{rule: (VQA class, evaluator class)} of the reference code."""
    tmp = tmp_path_factory.mktemp("vqa_reference")
    gt_api = python3_copy(VQA / "PythonHelperTools" / "vqaTools" / "vqa.py", tmp, "gt_vqa")
    gt_eval = python3_copy(VQA / "PythonEvaluationTools" / "vqaEvaluation" / "vqaEval.py", tmp, "gt_vqa_eval")
    out = {"official": (gt_api.VQA, gt_eval.VQAEval)}
    pytest.importorskip("nltk")  # the release's vqa_eval imports it at module level
    release_api = import_file("emu_release_vqa", RELEASE_VQA_TOOLS / "vqa.py")
    release_eval = import_file("emu_release_vqa_eval", RELEASE_VQA_TOOLS / "vqa_eval.py")
    out["emu_release"] = (release_api.VQA, release_eval.VQAEval)
    out["emu_release_okvqa"] = (release_api.VQA, release_eval.OKVQAEval)
    return out


def reference_accuracy(tools_for_rule, files: dict):
    """(per-question accuracy, overall), percentages rounded to 2 places as the tool stores them."""
    api, evaluator = tools_for_rule
    annotations = api(files["annotations"], files["questions"])
    scorer = evaluator(annotations, annotations.loadRes(files["results"], files["questions"]), n=2)
    scorer.evaluate()
    return scorer.evalQA, scorer.accuracy["overall"]


@pytest.mark.parametrize("rule", ["official", "emu_release", "emu_release_okvqa"])
def test_vqa_accuracy_equals_the_reference_code_per_question(tmp_path, tools, rule):
    files = write_hostile_set(tmp_path, seed=19, count=400)
    expected, overall = reference_accuracy(tools[rule], files)
    annotations, results = vqa.load_annotations(files["annotations"]), vqa.load_results(files["results"])
    ours = {q: round(100 * vqa.question_accuracy(results[q], answers, rule), 2) for q, answers in annotations.items()}
    wrong = {q: (results[q], [a["answer"] for a in annotations[q]], ours[q], expected[q])
             for q in ours if ours[q] != expected[q]}
    assert not wrong, f"{len(wrong)} questions differ, e.g. {list(wrong.items())[:3]}"
    assert round(vqa.score_vqa(files["results"], files["annotations"], files["questions"], rule)["accuracy"], 2) \
        == overall
    # the set is hostile enough to tell the rules apart and to score between 0 and 100
    other = {"official": "emu_release"}.get(rule, "official")
    differing = sum(vqa.question_accuracy(results[q], a, rule) != vqa.question_accuracy(results[q], a, other)
                    for q, a in annotations.items())
    assert differing >= 40 and 10 < overall < 90, (differing, overall)

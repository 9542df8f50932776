"""VQA accuracy as the official VQA evaluation computes it (VQAv2, OKVQA, VizWiz), the variants the
Emu release scored with, and exact-match accuracy for video QA (MSVD-QA, MSRVTT-QA).

Per question, each human answer entry is left out in turn and the prediction scores
min(1, matches among the others / 3); the question scores the mean (2 agreeing of 10 give 0.6, not
2/3). Entries are compared whole, as the official tool compares its answer dicts: VQAv2's carry an
`answer_id`, so one is left out at a time; entries equal in every field are left out together.

Which side is cleaned, and when, is a rule (`RULES`, by name):
- `official` (GT-Vision-Lab's `vqaEval.py`; the default): both sides lose newlines, tabs and outer
  spaces; only when the human answers then disagree are both normalised (punctuation, then lower
  case, number words to digits, articles, contractions). So "two", "Two" or "2." against ten
  identical "2" score 0.
- `emu_release` (the LAVIS copy Emu1's `mm_eval` scored VQAv2 with): the prediction is always
  normalised; the human answers are never stripped and, when they disagree, only lose punctuation.
- `emu_release_okvqa` (the release's OKVQA scorer): `emu_release` with nltk's Porter stemmer applied
  to each whole punctuation-stripped answer.
The release has no video QA scorer: a video QA prediction is right when it equals the answer after
both are normalised (`normalize`).

Files are the official formats: questions `{"questions": [{"question_id", "image_id", "question"}]}`,
annotations `{"annotations": [{"question_id", "answers": [{"answer", "answer_id"}, ...]}]}`, results
`[{"question_id", "answer"}]`; as the official `loadRes` asserts, results answer exactly the annotated
questions. An unreadable or malformed file is an error naming the file and the entry. Accuracies are
percentages.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable

from emu_jax.files import FormatError, read_json

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, look-behind typo included
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


# The official call passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
OFFICIAL_PERIOD_LIMIT = 32


class MissingTool(RuntimeError):
    """A scorer needs a program or package that is not installed (Java, nltk)."""


# ----------------------------------------------------------------------------- answer cleaning

def collapse_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, outer spaces go."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """A mark next to a space (or any mark, when the text has a digit,digit comma) is removed;
    otherwise it becomes a space. Periods go unless before a digit."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", out, count=OFFICIAL_PERIOD_LIMIT)


def digits_and_articles(text: str) -> str:
    """Lower case; number words to digits; articles dropped; contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize(answer: str) -> str:
    """An answer fully normalised: whitespace, punctuation, case, digits, articles, contractions."""
    return digits_and_articles(strip_punctuation(collapse_whitespace(answer)))


@functools.cache
def _porter_stemmer():
    try:
        from nltk.stem import PorterStemmer
    except ImportError as e:
        raise MissingTool("the emu_release_okvqa rule stems answers with nltk's Porter stemmer: "
                          "pip install nltk") from e
    return PorterStemmer()


def stemmed_punctuation(text: str) -> str:
    """The release's OKVQA punctuation step: the stripped text stemmed as one word (so only its end)."""
    return _porter_stemmer().stem(strip_punctuation(text))


def _unchanged(text: str) -> str:
    return text


def _punctuation_digits_articles(text: str) -> str:
    return digits_and_articles(strip_punctuation(text))


def _okvqa_prediction(text: str) -> str:
    return digits_and_articles(stemmed_punctuation(collapse_whitespace(text)))


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a question's answers are cleaned before matching: each side always, then both again when
    the cleaned human answers disagree."""
    human: Callable[[str], str]
    prediction: Callable[[str], str]
    human_if_disagreeing: Callable[[str], str]
    prediction_if_disagreeing: Callable[[str], str]


RULES = {
    "official": Rule(collapse_whitespace, collapse_whitespace, _punctuation_digits_articles,
                     _punctuation_digits_articles),
    "emu_release": Rule(_unchanged, normalize, strip_punctuation, _unchanged),
    "emu_release_okvqa": Rule(_unchanged, _okvqa_prediction, stemmed_punctuation, _unchanged),
}


def rule_named(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown VQA rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def question_accuracy(prediction: str, answers: list[dict], rule: str = "official") -> float:
    """One question's accuracy in [0, 1]: the mean over left-out human answer entries
    ({"answer", "answer_id", ...}) of min(1, matches among the other entries / 3)."""
    clean = rule_named(rule)
    humans = [clean.human(a["answer"]) for a in answers]
    predicted = clean.prediction(prediction)
    if len(set(humans)) > 1:
        humans = [clean.human_if_disagreeing(h) for h in humans]
        predicted = clean.prediction_if_disagreeing(predicted)
    entries = [{**a, "answer": h} for a, h in zip(answers, humans)]
    scores = [min(1, sum(other["answer"] == predicted for other in entries if other != left_out) / 3)
              for left_out in entries]
    return sum(scores) / len(scores)


def answer_entries(answers: list[str]) -> list[dict]:
    """Human answers as VQAv2 writes them: one entry and answer_id per annotator."""
    return [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]


def exact_match(prediction: str, answer: str) -> float:
    """Video QA: 1 when the normalised prediction equals the normalised answer."""
    return float(normalize(prediction) == normalize(answer))


# ----------------------------------------------------------------------------- official files



def _shown(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


def check_id(value, path: str, where: str, field: str):
    """An id as the official files write them: an integer or a string (a list or object cannot key
    a question)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FormatError(f"{path}: {where}: {field} is {_shown(value)}, not an integer or string")
    return value


def read_entries(path: str, key: str | None, id_field: str, strings: tuple[str, ...] = (),
                 others: tuple[str, ...] = ()) -> dict:
    """{id: entry} from the list under `key` (the file itself when None): each entry an object with
    an integer or string id, string `strings` fields and the `others`; a repeated id is an error."""
    data = read_json(path)
    entries = data.get(key) if key and isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise FormatError(f"{path}: expected " + (f'an object with a "{key}" list' if key else "a list of entries"))
    out = {}
    for i, entry in enumerate(entries):
        missing = [f for f in (id_field, *strings, *others) if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise FormatError(f"{path}: entry {i} ({_shown(entry)}) lacks {', '.join(missing)}")
        entry_id = check_id(entry[id_field], path, f"entry {i}", id_field)
        where = f"entry {i} ({id_field} {entry_id})"
        for field in strings:
            if not isinstance(entry[field], str):
                raise FormatError(f"{path}: {where}: {field} is {_shown(entry[field])}, not a string")
        if entry_id in out:
            raise FormatError(f"{path}: {where} repeats its {id_field}")
        out[entry_id] = entry
    return out


def _listed(ids: list) -> str:
    return ", ".join(_shown(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")


def require_same_ids(predictions_path: str, predicted, annotations_path: str, annotated, id_field: str) -> None:
    """Predictions for exactly the annotated ids (the official loadRes asserts equal sets): a stray
    or missing one is an error naming both files, a few of the ids and their count."""
    stray = [i for i in predicted if i not in annotated]
    missing = [i for i in annotated if i not in predicted]
    problems = []
    if stray:
        problems.append(f"{len(stray)} predicted {id_field} not in {annotations_path}: {_listed(stray)}")
    if missing:
        problems.append(f"no prediction for {len(missing)} of {len(annotated)} annotated {id_field}: "
                        f"{_listed(missing)}")
    if problems:
        raise FormatError(f"{predictions_path}: {'; '.join(problems)}")
    if not annotated:
        raise FormatError(f"{annotations_path}: no annotated entries to score")


def load_results(path: str) -> dict:
    """{question_id: answer} from an official result file."""
    return {q: e["answer"] for q, e in read_entries(path, None, "question_id", strings=("answer",)).items()}


def load_annotations(path: str) -> dict:
    """{question_id: [answer entries]} from an official annotation file."""
    entries = read_entries(path, "annotations", "question_id", others=("answers",))
    out = {}
    for i, (question, entry) in enumerate(entries.items()):
        answers = entry["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, dict) and "answer" in a
                                                                   for a in answers):
            raise FormatError(f"{path}: entry {i} (question_id {question}) needs a non-empty "
                              f'"answers" list of {{"answer": ...}}')
        for j, answer in enumerate(answers):
            if not isinstance(answer["answer"], str):
                raise FormatError(f"{path}: entry {i} (question_id {question}): answer {j} is "
                                  f"{_shown(answer['answer'])}, not a string")
        out[question] = answers
    return out


def load_questions(path: str) -> dict:
    """{question_id: entry} from an official question file."""
    return read_entries(path, "questions", "question_id", strings=("question",))


def score_vqa(results_path: str, annotations_path: str, questions_path: str | None = None,
              rule: str = "official") -> dict:
    """{"accuracy": percentage} over the annotated questions, each answered exactly once."""
    rule_named(rule)
    results, annotations = load_results(results_path), load_annotations(annotations_path)
    if questions_path:
        questions = load_questions(questions_path)
        unknown = [q for q in annotations if q not in questions]
        if unknown:
            raise FormatError(f"{annotations_path}: {len(unknown)} question_id not in {questions_path}: "
                              f"{_listed(unknown)}")
    require_same_ids(results_path, results, annotations_path, annotations, "question_id")
    scores = [question_accuracy(results[q], answers, rule) for q, answers in annotations.items()]
    return {"accuracy": 100.0 * sum(scores) / len(scores)}  # (100 * sum) / n, in the official order


def load_video_annotations(path: str) -> dict:
    """{question id: answer} from MSVD-QA / MSRVTT-QA's list of {"id" (or "question_id"),
    "question", "answer", "video_id"}."""
    data = read_json(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a list of {{id, question, answer}} entries")
    out = {}
    for i, entry in enumerate(data):
        field = "question_id" if isinstance(entry, dict) and "question_id" in entry else "id"
        if not isinstance(entry, dict) or field not in entry or not isinstance(entry.get("answer"), str):
            raise FormatError(f"{path}: entry {i} ({_shown(entry)}) needs an id and a string answer")
        key = check_id(entry[field], path, f"entry {i}", field)
        if key in out:
            raise FormatError(f"{path}: entry {i} ({field} {key}) repeats its {field}")
        out[key] = entry["answer"]
    return out


def score_video_qa(results_path: str, annotations_path: str) -> dict:
    """Exact-match accuracy (percentage) after normalisation; results use the annotations' ids as
    question_id and answer exactly the annotated questions."""
    results, answers = load_results(results_path), load_video_annotations(annotations_path)
    require_same_ids(results_path, results, annotations_path, answers, "question_id")
    scores = [exact_match(results[q], answer) for q, answer in answers.items()]
    return {"accuracy": 100.0 * sum(scores) / len(scores)}

"""VQA accuracy as the official VQA evaluation computes it (VQAv2, OKVQA, VizWiz), and exact-match
accuracy for video QA (MSVD-QA, MSRVTT-QA) after the same answer normalisation.

Normalisation (`normalize`) follows the official tool: punctuation removed or turned into spaces,
periods dropped unless part of a number, lower case, number words to digits, articles dropped,
contractions restored. Per question, each of the ten annotators is left out in turn and the
prediction scores min(1, matches among the other nine / 3); the question scores the mean of the ten
(so 2 agreeing annotators give 0.6, not 2/3). As the official tool, the ground-truth answers are
punctuation-normalised only when the annotators disagree. Accuracies are percentages.

Files are the official formats: questions `{"questions": [{"question_id", "image_id",
"question"}]}`, annotations `{"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}`,
results `[{"question_id", "answer"}]`. A malformed file is an error naming the file and the entry.
"""
from __future__ import annotations

import json
import re

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


class FormatError(ValueError):
    """A result, question or annotation file that is not in the official format."""


def strip_punctuation(text: str) -> str:
    """A mark next to a space (or any mark, when the text has a digit,digit comma) is removed;
    otherwise it becomes a space. Periods go unless between digits."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", out)


def digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize(answer: str) -> str:
    """A predicted answer as the official tool compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(answer))


def question_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The mean over leave-one-annotator-out subsets of min(1, matches / 3), in [0, 1]."""
    predicted = normalize(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for i, a in enumerate(humans) if i != left_out and a == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """Video QA: 1 when the normalised prediction equals the normalised answer."""
    return float(normalize(prediction) == normalize(answer))


# ----------------------------------------------------------------------------- official files

def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e


def _entries(data, path: str, key: str | None, fields: tuple[str, ...]) -> list[dict]:
    entries = data.get(key) if key and isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise FormatError(f"{path}: expected " + (f'an object with a "{key}" list' if key else "a list of entries"))
    for i, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise FormatError(f"{path}: entry {i} ({str(entry)[:80]}) lacks {', '.join(missing)}")
    return entries


def load_results(path: str) -> dict:
    """{question_id: answer} from an official result file; duplicates are an error."""
    out = {}
    for i, entry in enumerate(_entries(read_json(path), path, None, ("question_id", "answer"))):
        if entry["question_id"] in out:
            raise FormatError(f"{path}: entry {i} repeats question_id {entry['question_id']}")
        if not isinstance(entry["answer"], str):
            raise FormatError(f"{path}: entry {i} (question_id {entry['question_id']}) has a non-string answer")
        out[entry["question_id"]] = entry["answer"]
    return out


def load_annotations(path: str) -> dict:
    """{question_id: [human answers]} from an official annotation file."""
    out = {}
    for i, entry in enumerate(_entries(read_json(path), path, "annotations", ("question_id", "answers"))):
        answers = entry["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, dict) and "answer" in a
                                                                   for a in answers):
            raise FormatError(f"{path}: entry {i} (question_id {entry['question_id']}) needs a non-empty "
                              f'"answers" list of {{"answer": ...}}')
        out[entry["question_id"]] = [a["answer"] for a in answers]
    return out


def load_questions(path: str) -> dict:
    """{question_id: entry} from an official question file."""
    entries = _entries(read_json(path), path, "questions", ("question_id", "question"))
    return {e["question_id"]: e for e in entries}


def score_vqa(results_path: str, annotations_path: str, questions_path: str | None = None) -> dict:
    """{"accuracy": percentage} over the annotated questions; every one needs a prediction."""
    results, annotations = load_results(results_path), load_annotations(annotations_path)
    if questions_path:
        questions = load_questions(questions_path)
        unknown = sorted(set(annotations) - set(questions), key=str)
        if unknown:
            raise FormatError(f"{annotations_path}: question_id {unknown[0]} is not in {questions_path}")
    missing = sorted(set(annotations) - set(results), key=str)
    if missing:
        raise FormatError(f"{results_path}: no answer for question_id {missing[0]} "
                          f"({len(missing)} of {len(annotations)} annotated questions missing)")
    scores = [question_accuracy(results[q], answers) for q, answers in annotations.items()]
    return {"accuracy": 100.0 * sum(scores) / len(scores)}


def load_video_annotations(path: str) -> dict:
    """{question id: answer} from MSVD-QA / MSRVTT-QA's list of {"id" (or "question_id"),
    "question", "answer", "video_id"}."""
    data = read_json(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a list of {{id, question, answer}} entries")
    out = {}
    for i, entry in enumerate(data):
        key = entry.get("question_id", entry.get("id")) if isinstance(entry, dict) else None
        if key is None or not isinstance(entry.get("answer"), str):
            raise FormatError(f"{path}: entry {i} ({str(entry)[:80]}) needs an id and a string answer")
        out[key] = entry["answer"]
    return out


def score_video_qa(results_path: str, annotations_path: str) -> dict:
    """Exact-match accuracy (percentage) after normalisation; results use the annotations' ids as
    question_id."""
    results, answers = load_results(results_path), load_video_annotations(annotations_path)
    missing = sorted(set(answers) - set(results), key=str)
    if missing:
        raise FormatError(f"{results_path}: no answer for question_id {missing[0]}")
    scores = [exact_match(results[q], answer) for q, answer in answers.items()]
    return {"accuracy": 100.0 * sum(scores) / len(scores)}

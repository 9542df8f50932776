"""Evaluation tasks: what is asked (queries), what demonstrations are drawn from (the train pool),
how a prompt is laid out, the official result entry each answer becomes, and the score.

A few-shot prompt is the reference's interleaved layout: per demonstration its image(s) then its
text (question and answer), then the query's image(s) and question; the model continues with the
answer. Task families: the digits world (`digits_caption`, `digits_vqa`, `digits_chat`,
`digits_grounding`, `digits_labelling`, `digits_video`, `digits_t2i`, `digits_generation`, built from sklearn's digits,
nothing to download) and the released
benchmarks in their official files (`coco_caption`, `vqa` for VQAv2 / OKVQA / VizWiz, `videoqa` for
MSVD-QA / MSRVTT-QA, `coco_t2i`).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from typing import Any

import numpy as np

from emu_jax import chat
from emu_jax.data import digits, media
from emu_jax.eval import caption_metrics, vqa
from emu_jax.files import FormatError, read_json
from emu_jax.generate import prompts


@dataclasses.dataclass
class Example:
    key: Any  # the official id (image_id / question_id)
    images: list  # uint8 [S, S, 3] each; a video's sampled frames
    question: str = ""  # text between the image(s) and the answer
    target: str = ""  # the answer a demonstration shows
    meta: dict = dataclasses.field(default_factory=dict)


class Task:
    """Base: text answers to image queries, demonstrations from the whole pool."""
    name = ""
    kind = "text"  # "text" (answers) or "image" (text-to-image)
    video = False  # examples' images are a video's frames (laid out as the family's videos are)
    result_key, answer_field = "question_id", "answer"

    def queries(self) -> list[Example]:
        raise NotImplementedError

    def pool(self) -> list[Example]:
        raise NotImplementedError

    def demonstration_pool(self, query: Example) -> np.ndarray | None:
        """Indices into `pool()` this query's demonstrations may come from (None: all)."""
        return None

    def demonstration(self, example: Example, query: Example) -> Example:
        """A pool example as shown before `query` (digits_labelling relabels it)."""
        return example

    def visual(self, example: Example) -> list:
        if self.video:
            return [prompts.VideoInput(np.stack(example.images))]
        return [prompts.ImageInput(image) for image in example.images]

    def prompt(self, demonstrations: list[Example], query: Example) -> list:
        segments = []
        for demo in demonstrations:
            segments += self.visual(demo)
            segments.append(f"{demo.question} {demo.target}".strip())
        segments += self.visual(query)
        return segments + ([query.question] if query.question else [])

    def answer(self, text: str) -> str:
        """The model's continuation -> the answer recorded (first line, trimmed)."""
        return text.strip().split("\n")[0].strip()

    def result(self, query: Example, text: str) -> dict:
        return {self.result_key: query.key, self.answer_field: self.answer(text)}

    def image_result(self, query: Example, image, out_dir: str) -> dict:
        """Text-to-image: the image is written next to the results, which name its file."""
        file = f"{query.key}.png"
        with open(os.path.join(out_dir, file), "wb") as f:
            f.write(media.encode_png(image))
        return {self.result_key: query.key, "caption": query.question, "file": file}

    def score(self, results: list[dict], out_dir: str, features=None) -> dict:
        """`features` (images -> vectors) serves the Fréchet distance of text-to-image tasks."""
        raise NotImplementedError

    def missing_files(self) -> list[str]:
        """The files and folders the task reads that are not there (checked before a sweep starts)."""
        return []


# ----------------------------------------------------------------------------- the digits world

def names_digit(caption: str, digit: int) -> bool:
    """A caption is right when it names the digit and no other digit."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return digits.NAMES[digit] in words and not (words & (set(digits.NAMES) - {digits.NAMES[digit]}))


class _Digits(Task):
    def __init__(self, limit: int = 200, image_size: int = digits.IMAGE_SIZE, seed: int = 0):
        self.image_size, self.seed = image_size, seed
        images, labels = digits.load_digits()
        self._images, self._labels = images, labels
        self._test = digits.split_indices(len(images), "test")[:limit]
        self._train = digits.split_indices(len(images), "train")

    def _pixels(self, i: int) -> np.ndarray:
        return media.decode_image(media.encode_png(self._images[i]), self.image_size)

    def _examples(self, indices) -> list[Example]:
        return [self._example(int(i), int(self._labels[i])) for i in indices]

    def queries(self):
        return self._examples(self._test)

    def pool(self):
        return self._examples(self._train)


class DigitsCaption(_Digits):
    """Held-out captions; right when the caption names the digit and no other."""
    name, result_key, answer_field = "digits_caption", "image_id", "caption"

    def _example(self, i, d):
        return Example(i, [self._pixels(i)], "", digits.caption_text(d), {"digit": d})

    def score(self, results, out_dir, features=None):
        truth = {q.key: q.meta["digit"] for q in self.queries()}
        return {"accuracy": 100.0 * float(np.mean([names_digit(r["caption"], truth[r["image_id"]]) for r in results]))}


class DigitsVqa(_Digits):
    """"what digit is this?" scored by the official VQA accuracy (ten identical human answers)."""
    name = "digits_vqa"

    def _example(self, i, d):
        return Example(i, [self._pixels(i)], digits.VQA_QUESTION, digits.NAMES[d], {"digit": d})

    def score(self, results, out_dir, features=None):
        # ten annotators who agree on the digit's name, the answer the model learns ("seven"): the
        # official rule compares unanimous answers as written, so "7" or "Seven" would score 0
        truth = {q.key: vqa.answer_entries([q.target] * 10) for q in self.queries()}
        scores = [vqa.question_accuracy(r["answer"], truth[r["question_id"]]) for r in results]
        return {"accuracy": 100.0 * float(np.mean(scores))}


class DigitsChat(_Digits):
    """"what digit is this?" asked in a chat format (emu_jax/chat.py) about a held-out digit; right
    when the reply names the digit and no other (the chat-tuning recipe's figure)."""
    name = "digits_chat"

    def __init__(self, limit: int = 200, image_size: int = digits.IMAGE_SIZE, seed: int = 0,
                 chat_format: str = "emu2_chat"):
        super().__init__(limit, image_size, seed)
        self.format = chat.get(chat_format)

    def _example(self, i, d):
        return Example(i, [self._pixels(i)], "what digit is this?", f"it is a {digits.NAMES[d]}.", {"digit": d})

    def prompt(self, demonstrations, query):
        before, after = chat.prompt(self.format, ["\0" + query.question]).split("\0")
        return [before, *self.visual(query), after]

    def score(self, results, out_dir, features=None):
        truth = {q.key: q.meta["digit"] for q in self.queries()}
        return {"accuracy": 100.0 * float(np.mean([names_digit(r["answer"], truth[r["question_id"]])
                                                   for r in results]))}


class DigitsGrounding(_Digits):
    """"where is the digit?" about a held-out digit in a random box of a 64 px canvas, asked in the
    chat format's grounding mode; the reply names the box in the world's words (`digits.box_words`);
    right when it overlaps the truth with IoU >= 0.5 (also reported: the mean IoU, no box counting 0)."""
    name = "digits_grounding"

    def __init__(self, limit: int = 200, image_size: int = digits.IMAGE_SIZE, seed: int = 0,
                 chat_format: str = "emu2_chat"):
        super().__init__(limit, image_size, seed)
        self.format = chat.get(chat_format, grounding=True)

    def _example(self, i, d):
        canvas, box = digits.boxed(self._images[i], np.random.RandomState([self.seed, i]))
        return Example(i, [media.decode_image(media.encode_png(canvas), self.image_size)], "where is the digit?",
                       digits.box_words(box), {"digit": d, "box": box})

    def prompt(self, demonstrations, query):
        before, after = chat.prompt(self.format, ["\0" + query.question]).split("\0")
        return [before, *self.visual(query), after]

    def score(self, results, out_dir, features=None):
        truth = {q.key: q.meta["box"] for q in self.queries()}
        overlaps = [box_iou(found, truth[r["question_id"]]) if (found := digits.words_box(r["answer"])) else 0.0
                    for r in results]
        return {"accuracy": 100.0 * float(np.mean(np.asarray(overlaps) >= 0.5)),
                "mean_iou": 100.0 * float(np.mean(overlaps))}


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union if union > 0 else 0.0


class DigitsLabelling(_Digits):
    """In-context arbitrary labelling: per query, its digit and one other get nonce words (seeded
    per query); demonstrations are train images of those two digits shown as "this is a <word>.";
    the answer is right when the model names the query's word. Only the context can tell it, so
    accuracy should rise with the number of demonstrations."""
    name = "digits_labelling"

    def _words(self, query: Example) -> dict:
        rng = np.random.RandomState([self.seed, query.key])
        other = int(rng.choice([d for d in range(10) if d != query.meta["digit"]]))
        words = rng.choice(digits.NONCE_WORDS, size=2, replace=False)
        return {query.meta["digit"]: str(words[0]), other: str(words[1])}

    def _example(self, i, d):
        return Example(i, [self._pixels(i)], "this is a", "", {"digit": d})

    def queries(self):
        return [dataclasses.replace(q, target=self._words(q)[q.meta["digit"]]) for q in super().queries()]

    def demonstration_pool(self, query):
        labels = self._labels[self._train]
        return np.flatnonzero(np.isin(labels, list(self._words(query))))

    def demonstration(self, example, query):
        return dataclasses.replace(example, question="this is a", target=f"{self._words(query)[example.meta['digit']]}.")

    def answer(self, text):
        words = re.findall(r"[a-z]+", text.lower())
        return words[0] if words else ""

    def score(self, results, out_dir, features=None):
        truth = {q.key: q.target for q in self.queries()}
        return {"accuracy": 100.0 * float(np.mean([r["answer"] == truth[r["question_id"]] for r in results]))}


class DigitsVideo(_Digits):
    """Held-out digits sliding across the frame (the training videos' renderer; a direction seeded
    per digit), captioned by the model as "a handwritten <digit> moving <direction>". Right when
    the caption names the digit and the direction and no other; each part is also scored alone."""
    name, result_key, answer_field = "digits_video", "video_id", "caption"
    video = True

    def __init__(self, limit: int = 200, image_size: int = digits.IMAGE_SIZE, seed: int = 0, frames: int = 4):
        super().__init__(limit, image_size, seed)
        self.frames = frames  # as many as the model was trained on (config.data.video_frames)

    def _example(self, i, d):
        direction = digits.DIRECTIONS[np.random.RandomState([self.seed, i]).randint(len(digits.DIRECTIONS))]
        frames = media.decode_frames(digits.moving_frames(self._images[i], direction), self.image_size, self.frames)
        return Example(i, list(frames), "", f"{digits.caption_text(d)} moving {direction}",
                       {"digit": d, "direction": direction})

    def score(self, results, out_dir, features=None):
        truth = {q.key: q.meta for q in self.queries()}
        digit = [names_digit(r["caption"], truth[r["video_id"]]["digit"]) for r in results]
        direction = [set(re.findall(r"[a-z]+", r["caption"].lower())) & set(digits.DIRECTIONS)
                     == {truth[r["video_id"]]["direction"]} for r in results]
        return {"accuracy": 100.0 * float(np.mean(np.logical_and(digit, direction))),
                "digit_accuracy": 100.0 * float(np.mean(digit)),
                "direction_accuracy": 100.0 * float(np.mean(direction))}


class DigitsT2I(_Digits):
    """"a handwritten <digit>" -> an image; the independent digit classifier's accuracy on them,
    and the Fréchet distance to the real held-out digits in the visual encoder's features."""
    name, kind, result_key, answer_field = "digits_t2i", "image", "image_id", "caption"

    def _example(self, i, d):
        return Example(i, [], digits.caption_text(d), "", {"digit": d})

    def prompt(self, demonstrations, query):
        return [query.question, prompts.ImageRequest()]

    def score(self, results, out_dir, features=None):
        from emu_jax.eval import fid, recognisability
        truth = {q.key: q.meta["digit"] for q in self.queries()}
        images = np.stack([media.decode_image(open(os.path.join(out_dir, r["file"]), "rb").read(), self.image_size)
                           for r in results])
        labels = np.asarray([truth[r["image_id"]] for r in results])
        out = {"accuracy": 100.0 * recognisability.digit_accuracy(images, list(labels))}
        if features is not None and len(results) > 1:
            real = np.stack([self._pixels(int(i)) for i in self._test[:len(results)]])
            out["FID"] = fid.fid(images, real, features)
        return out


class DigitsGeneration(Task):
    """Emu2-Gen's grounded and subject-driven generation in the digits world (data/digits_gen.py): per
    held-out digit, "a handwritten <digit>" + a box image, and a canvas with the digit + "the same
    digit moved <direction>", each -> a canvas. Scored by the independent classifier on the crop at the
    target box (`crop_accuracy`) and by where the ink is (`in_box`), per kind and over both."""
    name, kind, result_key, answer_field = "digits_generation", "image", "image_id", "caption"

    def __init__(self, limit: int = 200, image_size: int = digits.IMAGE_SIZE, seed: int = 0):
        from emu_jax.data import digits_gen
        self.image_size = image_size
        self._examples = {e.key: e for e in digits_gen.examples("test", seed, limit)}

    def _pixels(self, pixels: np.ndarray) -> np.ndarray:
        return media.decode_image(media.encode_png(pixels), self.image_size)

    def _segment(self, item):
        if isinstance(item, str):
            return item
        kind, value = item
        if kind == "box":  # drawn as `data.write generation` draws a prompt's {"box": ...}
            from emu_jax.data import digits_gen
            return prompts.ImageInput(self._pixels(media.box_image(*digits_gen.box_entry(value)["box"])))
        return prompts.ImageInput(self._pixels(value))

    def queries(self):
        return [Example(key, [], " ".join(i for i in e.prompt if isinstance(i, str)), "", {"digit": e.digit})
                for key, e in self._examples.items()]

    def prompt(self, demonstrations, query):
        return [self._segment(item) for item in self._examples[query.key].prompt] + [prompts.ImageRequest()]

    def score(self, results, out_dir, features=None):
        from emu_jax.eval import recognisability
        out = {}
        for kind in ("grounded", "subject", ""):
            chosen = [r for r in results if self._examples[r["image_id"]].kind.startswith(kind)]
            if not chosen:
                continue
            images = np.stack([media.decode_image(open(os.path.join(out_dir, r["file"]), "rb").read(),
                                                  self.image_size) for r in chosen])
            examples = [self._examples[r["image_id"]] for r in chosen]
            found = recognisability.placement(images, [e.box for e in examples], [e.digit for e in examples],
                                              digits.CANVAS_SIZE)
            out |= {f"{kind}_{k}" if kind else k: 100.0 * v for k, v in found.items()}
        return out


# ----------------------------------------------------------------------------- released benchmarks

def _image_path(image_dir: str, pattern: str, entry: dict) -> str:
    return os.path.join(image_dir, pattern.format(**entry))


class _FileTask(Task):
    """A benchmark read from its official files: `limit` queries (0: all) from the test files and up
    to `pool_limit` demonstrations from the train files, decoded into memory."""
    limit, pool_limit = 0, 2000

    def _load(self, split: str) -> list[Example]:
        raise NotImplementedError

    def _count(self, split: str) -> int | None:
        return (self.limit if split == "test" else self.pool_limit) or None

    def queries(self):
        return self._load("test")

    def pool(self):
        return self._load("train")

    def missing_files(self):
        """`files`: per split, the paths it reads (the train split's default to the test split's)."""
        return sorted({path for paths in self.files.values() for path in paths if not os.path.exists(path)})


class CocoCaption(_FileTask):
    """COCO caption files (e.g. Karpathy test): {"images": [{"id", "file_name"}], "annotations":
    [{"image_id", "caption"}]}; CIDEr-D, BLEU-4, METEOR, ROUGE-L via pycocoevalcap."""
    name, result_key, answer_field = "coco_caption", "image_id", "caption"

    def __init__(self, annotations, images, train_annotations="", train_images="", image_size=224, limit=0,
                 prompt=""):
        self.files = dict(test=(annotations, images), train=(train_annotations or annotations,
                                                             train_images or images))
        self.image_size, self.limit, self.question = image_size, limit, prompt

    def _load(self, split):
        path, image_dir = self.files[split]
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise FormatError(f'{path}: expected a COCO caption file with an "images" list')
        refs = caption_metrics.load_references(path)
        out = []
        for i, entry in enumerate(data["images"][:self._count(split)]):
            if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
                raise FormatError(f"{path}: image {i} ({str(entry)[:80]}) needs id and file_name")
            file = os.path.join(image_dir, entry["file_name"])
            out.append(Example(entry["id"], [prompts.load_image(file, self.image_size)], self.question,
                               (refs.get(entry["id"]) or [""])[0]))
        return out

    def score(self, results, out_dir, features=None):
        refs = caption_metrics.load_references(self.files["test"][0])
        predictions = {r["image_id"]: r["caption"] for r in results}
        return caption_metrics.score_captions(predictions, {k: refs[k] for k in predictions})


class Vqa(_FileTask):
    """VQAv2 / OKVQA / VizWiz official question + annotation files and an image folder; images
    named by `image_pattern` over the question entry (VizWiz questions carry an "image" name);
    scored by `rule` (vqa.RULES: the official evaluation, or the Emu release's VQAv2 / OKVQA variant)."""
    name = "vqa"

    def __init__(self, questions, annotations, images, train_questions="", train_annotations="", train_images="",
                 image_pattern="COCO_val2014_{image_id:012d}.jpg", train_image_pattern="", image_size=224, limit=0,
                 prompt="question: {question} answer:", rule="official"):
        vqa.rule_named(rule)  # an unknown name fails here, before any generation
        self.rule = rule
        self.files = dict(test=(questions, annotations, images),
                          train=(train_questions or questions, train_annotations or annotations, train_images or images))
        self.patterns = dict(test=image_pattern, train=train_image_pattern or image_pattern)
        self.image_size, self.limit, self.template = image_size, limit, prompt

    def _load(self, split):
        (questions_path, annotations_path, image_dir), pattern = self.files[split], self.patterns[split]
        questions = list(vqa.load_questions(questions_path).values())[:self._count(split)]
        answers = vqa.load_annotations(annotations_path)
        out = []
        for q in questions:
            file = os.path.join(image_dir, q["image"]) if "image" in q else _image_path(image_dir, pattern, q)
            human = [a["answer"] for a in answers.get(q["question_id"], [{"answer": ""}])]
            out.append(Example(q["question_id"], [prompts.load_image(file, self.image_size)],
                               self.template.format(question=q["question"]), max(set(human), key=human.count),
                               {"answers": human}))
        return out

    def score(self, results, out_dir, features=None):
        answers = vqa.load_annotations(self.files["test"][1])
        scores = [vqa.question_accuracy(r["answer"], answers[r["question_id"]], self.rule) for r in results]
        return {"accuracy": 100.0 * float(np.mean(scores))}


class VideoQa(_FileTask):
    """MSVD-QA / MSRVTT-QA: [{"id", "question", "answer", "video_id"}] and a video folder (files
    named by `video_pattern`); exact match after VQA normalisation."""
    name = "videoqa"
    video = True

    def __init__(self, annotations, videos, train_annotations="", train_videos="", video_pattern="vid{video_id}.avi",
                 image_size=224, frames=8, limit=0, prompt="question: {question} answer:"):
        self.files = dict(test=(annotations, videos), train=(train_annotations or annotations, train_videos or videos))
        self.pattern, self.image_size, self.frames, self.limit, self.template = (video_pattern, image_size, frames,
                                                                                 limit, prompt)

    def _load(self, split):
        path, video_dir = self.files[split]
        vqa.load_video_annotations(path)  # validates
        out = []
        for entry in read_json(path)[:self._count(split)]:
            key = entry.get("question_id", entry.get("id"))
            frames = prompts.load_video(_image_path(video_dir, self.pattern, entry), self.image_size, self.frames)
            out.append(Example(key, frames, self.template.format(question=entry["question"]), entry["answer"]))
        return out

    def score(self, results, out_dir, features=None):
        truth = vqa.load_video_annotations(self.files["test"][0])
        return {"accuracy": 100.0 * float(np.mean([vqa.exact_match(r["answer"], truth[r["question_id"]])
                                                   for r in results]))}


class CocoT2I(CocoCaption):
    """COCO captions -> images; FID against the captions' real images."""
    name, kind = "coco_t2i", "image"

    def queries(self):
        return [dataclasses.replace(q, images=[], question=q.target, meta={"real": q.images[0]})
                for q in self._load("test")]

    def prompt(self, demonstrations, query):
        return [query.question, prompts.ImageRequest()]

    def score(self, results, out_dir, features=None):
        from emu_jax.eval import fid
        if features is None:
            raise ValueError("coco_t2i needs a feature network (sweep.fid_features)")
        real = {q.key: q.meta["real"] for q in self.queries()}
        images = np.stack([media.decode_image(open(os.path.join(out_dir, r["file"]), "rb").read(), self.image_size)
                           for r in results])
        return {"FID": fid.fid(images, np.stack([real[r["image_id"]] for r in results]), features)}


TASKS = {cls.name: cls for cls in (DigitsCaption, DigitsVqa, DigitsChat, DigitsGrounding, DigitsLabelling, DigitsVideo, DigitsT2I,
                                   DigitsGeneration, CocoCaption,
                                   Vqa, VideoQa, CocoT2I)}


def task_class(kind: str) -> type:
    if kind not in TASKS:
        raise ValueError(f"unknown evaluation task {kind!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[kind]


def make_task(spec) -> Task:
    """A task from its sweep entry: {"kind": name, ...its keyword arguments}."""
    options = dict(spec)
    return task_class(options.pop("kind"))(**options)


class TaskConfigError(ValueError):
    """A task entry that cannot run, named by where it stands in its config."""


def checked_task(spec, where: str) -> Task:
    """The task an entry describes (a sweep entry's "shots" aside), or a TaskConfigError naming
    `where`: no kind or an unknown one, an option the task does not take or refuses, a file it reads
    that is not there. Run before anything starts, so that no typo surfaces after hours of training or
    of a sweep."""
    options = {k: v for k, v in dict(spec).items() if k != "shots"}
    kind = options.pop("kind", None)
    try:
        task_type = task_class(kind)
        inspect.signature(task_type).bind(**options)
        task = task_type(**options)
    except TypeError as e:  # from bind: an option the task does not take, or one it needs and was not given
        raise TaskConfigError(f"{where} ({kind}): {e}; it takes {', '.join(inspect.signature(task_type).parameters)}"
                              ) from None
    except ValueError as e:  # an unknown kind, or an option's value the task refuses
        raise TaskConfigError(f"{where}: {e}") from None
    missing = task.missing_files()
    if missing:
        raise TaskConfigError(f"{where} ({kind}): no such file or folder {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return task


def write_json(path: str, value) -> None:
    """Atomically: a killed sweep never leaves a half-written file that looks finished."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)

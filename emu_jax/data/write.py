"""Turn common source formats into ArrayRecord shards of documents (see `emu_jax.data.records`).

    python -m emu_jax.data.write pairs --input=captions.jsonl --output=out/laion      # {"image", "caption"}
    python -m emu_jax.data.write pairs --input=folder/ --output=out/pairs              # a.jpg + a.txt
    python -m emu_jax.data.write mmc4 --input=docs.jsonl --image_root=images/ --output=out/mmc4
    python -m emu_jax.data.write video --input=clips.jsonl --output=out/webvid          # {"video", "caption"}
    python -m emu_jax.data.write storyboard --input=boards.jsonl --output=out/story
    python -m emu_jax.data.write conversations --input=llava_instruct.json --image_root=coco/ --output=out/chat
    python -m emu_jax.data.write generation --input=gen.jsonl --output=out/gen             # {"prompt", "image"}

JSONL paths are relative to `--image_root` (default: the JSONL's folder). MMC4 lines hold
`text_list` and `image_info` entries with `image_name` and `matched_text_index`; each image goes
before its matched sentence. Storyboard lines hold `frames` [{"image", "time"}] and `subtitles`
[{"start", "end", "text"}], merged in time order. Conversations (LLaVA / ShareGPT JSON: a list of, or one per line,
{"image": path or [paths] | "video": path, "conversations": [{"from": "human"|"gpt"|"system", "value"}]})
become documents whose segments carry roles; `<image>` / `<video>` tags place the media (untagged
media open the first user turn), and the pipeline renders them in the model's chat format
(`data.chat_format`; an entry with "grounding": true in its grounding mode, boxes written as text
`[x1, y1, x2, y2]` in 0-224). Generation tuning (Emu2-Gen's recipe: the regression loss on the image to
generate, nothing else) reads lines {"prompt": text or a list of items, "image": the image to
generate}; an item is text, {"image": path} (subject-driven generation) or {"box": [x1, y1, x2, y2]}
(grounded generation: Emu2-Gen's box image, a white outline on a black 448x448 canvas, in its
pixels), e.g. ["<grounding>a photo of <phrase>a dog</phrase><object>", {"box": [40, 60, 300, 420]},
"</object>"]. The prompt is written as context (never scored), the image last. A bad line (not UTF-8, not JSON, a missing or
mistyped field, an unreadable file, a video that does not open) stops the run with an error naming
the file and line, and no finished-looking shard is left: shards are written under hidden names
and renamed only once all are complete (`--skip_missing` drops MMC4 images whose files are missing
instead, and counts them).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter

from absl import app, flags
from tqdm import tqdm

from emu_jax.data import media, records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def parse_line(raw: bytes, where: str) -> dict | None:
    """A JSONL line's object (None for a blank line); a SourceError naming `where` otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise records.SourceError(f"{where}: not UTF-8 (byte {e.start} of the line)", "not_utf8") from e
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise records.SourceError(f"{where}: not JSON: {e}", "not_json") from e
    if not isinstance(entry, dict):
        raise records.SourceError(f"{where}: expected a JSON object", "not_object")
    return entry


def _jsonl(path: str):
    if not os.path.isfile(path):
        raise records.SourceError(f"{path}: no such JSONL file")
    with open(path, "rb") as f:  # decoded line by line: a bad byte is reported at its line
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            entry = parse_line(raw, where)
            if entry is not None:
                yield where, entry


def _json_entries(path: str):
    """(where, entry) of a JSON list file (LLaVA's, ShareGPT's: `where` names the entry) or a JSONL file."""
    if not path.endswith(".json"):
        yield from _jsonl(path)
        return
    if not os.path.isfile(path):
        raise records.SourceError(f"{path}: no such JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise records.SourceError(f"{path}: not a JSON file: {e}") from e
    if not isinstance(entries, list):
        raise records.SourceError(f"{path}: expected a JSON list of conversations")
    for i, entry in enumerate(entries):
        yield f"{path}: entry {i}", entry


def _field(entry: dict, key: str, where: str, kind=str):
    if not isinstance(entry, dict):
        raise records.SourceError(f"{where}: expected an object with {key!r}, got {type(entry).__name__}",
                                  "wrong_type")
    if key not in entry:
        raise records.SourceError(f"{where}: missing field {key!r}", "missing_field")
    if not isinstance(entry[key], kind):
        raise records.SourceError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}",
                                  "wrong_type")
    return entry[key]


# ----------------------------------------------------------------------------- one entry -> a document
# Each takes (entry, where, root, counts): a JSON object from the line (or list entry) `where`,
# the folder its paths are relative to, and a Counter it adds to; it returns the document or
# raises a SourceError naming `where`.

def pair_document(entry: dict, where: str, root: str, counts: Counter) -> dict:
    image_path = os.path.join(root, _field(entry, "image", where))
    return records.document([records.image(records.read_source(image_path, where)),
                             records.text(_field(entry, "caption", where))], "pairs")


def mmc4_document(entry: dict, where: str, root: str, counts: Counter, skip_missing: bool = False) -> dict:
    texts = _field(entry, "text_list", where, list)
    by_sentence: dict[int, list[bytes]] = {}
    for info in _field(entry, "image_info", where, list):
        index = _field(info, "matched_text_index", where, int)
        if not 0 <= index < len(texts):
            raise records.SourceError(f"{where}: matched_text_index {index} outside text_list of {len(texts)}")
        path = os.path.join(root, _field(info, "image_name", where))
        if skip_missing and not os.path.exists(path):
            counts["missing_images"] += 1
            continue
        by_sentence.setdefault(index, []).append(records.read_source(path, where))
    segments = []
    for i, sentence in enumerate(texts):
        segments += [records.image(b) for b in by_sentence.get(i, [])] + [records.text(sentence)]
    return records.document(segments, "mmc4", url=entry.get("url", ""))


def video_document(entry: dict, where: str, root: str, counts: Counter) -> dict:
    import av
    path = os.path.join(root, _field(entry, "video", where))
    encoded = records.read_source(path, where)
    try:  # probe the container so that a broken file is reported here, not at training time
        with av.open(path) as container:
            if not container.streams.video:
                raise records.SourceError(f"{where}: {path} has no video stream")
    except av.FFmpegError as e:
        raise records.SourceError(f"{where}: {path} is not a readable video: {e}") from e
    return records.document([records.video(encoded), records.text(_field(entry, "caption", where))], "video")


def storyboard_document(entry: dict, where: str, root: str, counts: Counter) -> dict:
    events = []
    for frame in _field(entry, "frames", where, list):
        path = os.path.join(root, _field(frame, "image", where))
        time = float(_field(frame, "time", where, (int, float)))
        events.append((time, 0, records.image(records.read_source(path, where))))
    for subtitle in _field(entry, "subtitles", where, list):
        events.append((float(_field(subtitle, "start", where, (int, float))), 1,
                       records.text(_field(subtitle, "text", where))))
    if not events:
        raise records.SourceError(f"{where}: storyboard has neither frames nor subtitles")
    return records.document([segment for _, _, segment in sorted(events, key=lambda e: e[:2])], "storyboard")


def pair_documents(input_path: str, root: str, counts: Counter):
    """Image-caption pairs from a folder (image + same-stem .txt) or a JSONL."""
    if os.path.isdir(input_path):
        for name in sorted(os.listdir(input_path)):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            caption_path = os.path.join(input_path, stem + ".txt")
            where = os.path.join(input_path, name)
            if not os.path.exists(caption_path):
                raise records.SourceError(f"{where}: no caption file {caption_path}")
            try:
                caption = records.read_source(caption_path, where).decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise records.SourceError(f"{caption_path}: not UTF-8 (byte {e.start})") from e
            image = records.read_source(where, where)
            yield where, records.document([records.image(image), records.text(caption)], "pairs", file=name)
        return
    for where, entry in _jsonl(input_path):
        yield where, pair_document(entry, where, root, counts)


SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_TAG = re.compile(r"<image>|<video>")


def _turn(text: str, role: str, media: list[dict], where: str) -> list[dict]:
    """One turn's segments: its text cut at `<image>` / `<video>` tags, the media in their places."""
    segments = []
    for i, part in enumerate(MEDIA_TAG.split(text)):
        if i:
            if not media:
                raise records.SourceError(f"{where}: more <image>/<video> tags than media")
            segments.append(dict(media.pop(0), role=role))
        if part.strip():
            segments.append({"text": part.strip(), "role": role})
    return segments


def conversation_document(entry: dict, where: str, root: str, counts: Counter) -> dict:
    if not isinstance(entry, dict):
        raise records.SourceError(f"{where}: expected a JSON object")
    images = entry.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise records.SourceError(f"{where}: field 'image' should be a path or a list of paths")
    media = [records.image(records.read_source(os.path.join(root, p), where)) for p in images]
    if "video" in entry:
        media.append(records.video(records.read_source(os.path.join(root, _field(entry, "video", where)), where)))
    turns = _field(entry, "conversations", where, list)
    tagged = sum(len(MEDIA_TAG.findall(t.get("value", ""))) for t in turns if isinstance(t, dict))
    if media and not tagged:  # untagged media open the first user turn (LLaVA's convention)
        turns = [dict(turns[0], value="<image>" * len(media) + _field(turns[0], "value", where))] + turns[1:]
    elif tagged != len(media):
        raise records.SourceError(f"{where}: {tagged} <image>/<video> tags for {len(media)} media")
    segments = []
    for turn in turns:
        speaker = _field(turn, "from", where)
        if speaker not in SPEAKERS:
            raise records.SourceError(f"{where}: speaker {speaker!r} is not one of {', '.join(SPEAKERS)}")
        segments += _turn(_field(turn, "value", where), SPEAKERS[speaker], media, where)
    counts["turns"] += len(turns)
    grounding = entry.get("grounding", False)
    if not isinstance(grounding, bool):
        raise records.SourceError(f"{where}: field 'grounding' should be true or false")
    counts["grounding_conversations"] += grounding
    return records.document(segments, "conversations", id=str(entry.get("id", "")),
                            **({"grounding": True} if grounding else {}))


def _prompt_item(item, root: str, where: str, counts: Counter) -> dict:
    if isinstance(item, str):
        return records.text(item)
    if isinstance(item, dict) and "image" in item:
        counts["prompt_images"] += 1
        return records.image(records.read_source(os.path.join(root, _field(item, "image", where)), where))
    if isinstance(item, dict) and "box" in item:
        box = _field(item, "box", where, list)
        if len(box) != 4 or not all(isinstance(v, int) for v in box):
            raise records.SourceError(f"{where}: a box is four integers [x1, y1, x2, y2], got {box}")
        counts["box_images"] += 1
        return records.image(media.encode_png(media.box_image(*box)))
    raise records.SourceError(f"{where}: a prompt item is text, {{\"image\": path}} or {{\"box\": [x1, y1, x2, y2]}}, "
                              f"got {item!r:.80}")


def generation_document(entry: dict, where: str, root: str, counts: Counter) -> dict:
    prompt = _field(entry, "prompt", where, (str, list))
    items = [prompt] if isinstance(prompt, str) else prompt
    context = [dict(_prompt_item(item, root, where, counts), context=True) for item in items]
    target = records.image(records.read_source(os.path.join(root, _field(entry, "image", where)), where))
    return records.document(context + [target], "generation")


# kind: one entry -> a document (also what the Beam pipelines of `emu_jax.data.beam_write` run per line)
ENTRY_WRITERS = {"pairs": pair_document, "mmc4": mmc4_document, "video": video_document,
                 "storyboard": storyboard_document, "conversations": conversation_document,
                 "generation": generation_document}


def _entry_documents(kind: str):
    """kind's whole-file reader: (where, document) for each entry of a JSONL file (or, for
    conversations, a JSON list)."""
    entries = _json_entries if kind == "conversations" else _jsonl

    def documents(input_path: str, root: str, counts: Counter, **extra):
        for where, entry in entries(input_path):
            yield where, ENTRY_WRITERS[kind](entry, where, root, counts, **extra)
    return documents


# each yields (where, document): where names the file and line
WRITERS = {kind: _entry_documents(kind) for kind in ENTRY_WRITERS} | {"pairs": pair_documents}


def convert(kind: str, input_path: str, output: str, image_root: str | None = None, num_shards: int = 1,
            skip_missing: bool = False) -> tuple[list[str], Counter]:
    """Writes the shards; returns their paths and counts (documents, images, ...)."""
    root = image_root or (input_path if os.path.isdir(input_path) else os.path.dirname(input_path))
    counts: Counter = Counter()
    extra = {"skip_missing": skip_missing} if kind == "mmc4" else {}
    with records.ShardWriter(output, num_shards) as writer:
        for where, doc in tqdm(WRITERS[kind](input_path, root, counts, **extra), desc=kind, unit=" docs"):
            try:
                writer.write(doc)
            except records.RecordError as e:  # a document of the wrong shape: a text that is not a string, ...
                raise records.SourceError(f"{where}: {e}") from e
            counts["documents"] += 1
            for segment in doc["segments"]:
                counts[records.segment_kind(segment) + "_segments"] += 1
    return writer.paths, counts


def main(argv):
    if len(argv) != 2 or argv[1] not in WRITERS:
        raise app.UsageError(f"usage: python -m emu_jax.data.write {{{','.join(WRITERS)}}} --input=... --output=...")
    f = flags.FLAGS
    try:
        paths, counts = convert(argv[1], f.input, f.output, f.image_root, f.num_shards, f.skip_missing)
    except (records.SourceError, records.RecordError) as e:
        sys.exit(f"error: {e}")
    for key, value in sorted(counts.items()):
        print(f"{key}: {value}")
    print("\n".join(paths))


def define_flags():
    flags.DEFINE_string("input", None, "A JSONL file (or, for pairs, a folder).", required=True)
    flags.DEFINE_string("output", None, "Shard prefix: writes PREFIX-00000-of-0000N.array_record.", required=True)
    flags.DEFINE_string("image_root", None, "Folder that JSONL paths are relative to (default: the input's).")
    flags.DEFINE_integer("num_shards", 1, "Number of ArrayRecord shards.")
    flags.DEFINE_bool("skip_missing", False, "mmc4: drop images whose files are missing, and count them.")


if __name__ == "__main__":
    define_flags()
    app.run(main)

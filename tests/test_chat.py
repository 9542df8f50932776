"""Fine-tuning data: conversations (LLaVA / ShareGPT files -> role documents -> the model's chat format,
trained on replies only) and generation-tuning documents (a prompt as context -> the image to generate)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from emu_jax import chat, config_lib
from emu_jax import tokens as tokens_lib
from emu_jax.data import pipeline, records, write
from emu_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).resize((64, 64)).save(folder / f"{name}.jpg")
    return folder


LLAVA = [{"id": "a1", "image": "astronaut.jpg", "conversations": [
              {"from": "human", "value": "<image>\nWho is this?"}, {"from": "gpt", "value": "an astronaut"},
              {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "in front of a flag"}]},
         {"id": "c1", "image": ["coffee.jpg", "astronaut.jpg"], "conversations": [
              {"from": "system", "value": "Be brief."},
              {"from": "human", "value": "Compare <image> with <image>."}, {"from": "gpt", "value": "cup vs suit"}]},
         {"id": "t1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]


def test_llava_and_sharegpt_files_become_documents_with_roles(photos, tmp_path):
    source = photos / "llava.json"
    source.write_text(json.dumps(LLAVA))
    paths, counts = write.convert("conversations", str(source), str(tmp_path / "chat"))
    assert counts["documents"] == 3 and counts["turns"] == 9 and counts["image_segments"] == 3
    reader = records.ShardReader({path: records.count_records(path) for path in paths})
    docs = [records.decode(reader[i]) for i in range(len(reader))]
    first = docs[0]["segments"]
    assert [(s.get("role"), records.segment_kind(s)) for s in first] == [
        ("user", "image"), ("user", "text"), ("assistant", "text"), ("user", "text"), ("assistant", "text")]
    assert first[1]["text"] == "Who is this?"
    second = docs[1]["segments"]
    assert [s.get("text", "<img>") for s in second] == ["Be brief.", "Compare", "<img>", "with", "<img>", ".",
                                                        "cup vs suit"]
    coffee = np.asarray(Image.open(photos / "coffee.jpg"))
    from emu_jax.data import media
    assert np.array_equal(media.decode_image(second[2]["image"], 64), coffee)  # the tag order places the media


@pytest.mark.parametrize("entry, message", [
    ({"image": "astronaut.jpg", "conversations": [{"from": "human", "value": "<image><image>?"}]},
     "entry 0: 2 <image>/<video> tags for 1 media"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "entry 0: speaker 'bot' is not one of"),
    ({"image": "nowhere.jpg", "conversations": []}, "entry 0: cannot read"),
    ({"conversations": "hi"}, "entry 0: field 'conversations' should be list"),
])
def test_a_bad_conversation_is_named_and_nothing_is_written(photos, tmp_path, entry, message):
    source = photos / f"bad_{abs(hash(message))}.json"
    source.write_text(json.dumps([entry]))
    with pytest.raises(records.SourceError, match=message):
        write.convert("conversations", str(source), str(tmp_path / "bad"))
    assert not list(tmp_path.glob("bad*.array_record"))


def chat_setup(tokenizer):
    """The tiny Emu2 with Emu2-Chat's two extra tokens, and a tokenizer that knows them."""
    special, vocab = tokens_lib.emu2_tokens(base=512, chat=True)
    config = load_config("tiny")
    with config.unlocked():
        config.model.tokens = special
        config.model.llm.vocab_size = vocab
    return config, Tokenizer(tokenizer.model_path, special)


def one_document_row(tok, layout, doc) -> tuple[dict, dict]:
    """(the tokenised document, its finished row: masks included) for a row holding that document alone."""
    example = pipeline.TokenizeDocument(tok, layout).map(("doc", 0, records.encode(doc)))
    n = len(example["tokens"])
    return example, pipeline.FinishRow(layout.special)({
        "tokens": example["tokens"], "targets": example["targets"], "tokens_segment_ids": np.ones(n, np.int32),
        "tokens_positions": np.arange(n), "images": example["images"],
        "images_segment_ids": np.ones(len(example["images"])), "events": example["events"]})


def test_a_conversation_is_rendered_in_the_chat_format_and_only_replies_are_targets(photos, tokenizer):
    """The tokens are the Emu2-Chat text (the generation prompt's own format, emu_jax/chat.py), and
    a prediction is scored exactly where the next token is a reply's or its turn end's."""
    config, tok = chat_setup(tokenizer)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    doc = records.document([{"image": open(photos / "astronaut.jpg", "rb").read(), "role": "user"},
                            {"text": "who is this?", "role": "user"}, {"text": "a dax", "role": "assistant"},
                            {"text": "where?", "role": "user"}, {"text": "a wug", "role": "assistant"}])
    example, row = one_document_row(tok, layout, doc)
    ids = list(example["tokens"])
    block = tokens_lib.image_block(layout.special, 4)
    expected_text = chat.prompt(chat.FORMATS["emu2_chat"], ["who is this?", "a dax", "where?"])
    prefix, rest = expected_text.split(" [USER]: ", 1)
    expected = [tok.bos_id] + tok.encode(prefix + " [USER]: ") + block + tok.encode(rest + " a wug") + [tok.eos_id]
    assert ids == expected
    mask = row["text_mask"]
    trained = [ids[t + 1] for t in np.flatnonzero(mask)]
    assert trained == tok.encode("a dax") + [tok.eos_id] + tok.encode("a wug") + [tok.eos_id]  # replies, turn ends


def test_a_user_turns_tokens_change_no_gradient(photos, tokenizer):
    """The labels of user and system tokens do not reach the loss: relabelling them (the model's
    inputs kept) leaves every gradient as it was; relabelling a reply's token does not."""
    from model_helpers import init_params

    from emu_jax.models.emu import build_model
    from emu_jax.train.losses import emu_loss
    config, tok = chat_setup(tokenizer)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    doc = records.document([{"text": "be brief.", "role": "system"},
                            {"image": open(photos / "coffee.jpg", "rb").read(), "role": "user"},
                            {"text": "what is this?", "role": "user"}, {"text": "a cup", "role": "assistant"}])
    example, row = one_document_row(tok, layout, doc)
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], row)
    model = build_model(config.model)
    params = init_params(model)

    def grads(labels):
        def loss(p):
            out = model.apply({"params": p}, **pipeline.model_inputs(batch))
            return emu_loss(out, dict(batch, tokens=labels), text_weight=1.0, regression_weight=1.0)[0]
        return jax.grad(loss)(params)

    tokens = np.asarray(batch["tokens"])
    context = np.flatnonzero(np.asarray(example["targets"]) == 0)[1:]  # system and user tokens (not BOS)
    reply = np.flatnonzero(np.asarray(example["targets"]) == 1)[0]
    relabelled = tokens.copy()
    relabelled[0, context] = 7
    same = grads(jnp.asarray(relabelled))
    jax.tree.map(np.testing.assert_array_equal, same, grads(batch["tokens"]))
    relabelled[0, reply] = 7
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(grads(jnp.asarray(relabelled))), jax.tree.leaves(same)))


GENERATION = [{"prompt": "a cup of coffee", "image": "coffee.jpg"},
              {"prompt": [{"image": "astronaut.jpg"}, "the same person, smiling"], "image": "astronaut.jpg"},
              {"prompt": ["<grounding>a photo of <phrase>a cup</phrase><object>", {"box": [40, 60, 300, 420]},
                          "</object>"], "image": "coffee.jpg"}]


def test_generation_documents_score_the_target_image_alone(photos, tmp_path, tokenizer):
    """Text -> image, subject-driven and grounded lines: the prompt (text, images, Emu2-Gen's box
    image) is context; the regression mask covers the target image's block only (the prediction
    at its [IMG] and its <image>s but the last), not a prompt image's; no text is scored but the
    document's end."""
    from emu_jax.data import media
    source = photos / "gen.jsonl"
    source.write_text("\n".join(json.dumps(e) for e in GENERATION))
    paths, counts = write.convert("generation", str(source), str(tmp_path / "gen"))
    assert (counts["documents"], counts["prompt_images"], counts["box_images"]) == (3, 1, 1)
    reader = records.ShardReader({path: records.count_records(path) for path in paths})
    docs = [records.decode(reader[i]) for i in range(len(reader))]
    assert [[s.get("context", False) for s in d["segments"]] for d in docs] == [[True, False], [True, True, False],
                                                                                 [True, True, True, False]]
    assert np.array_equal(media.decode_image(docs[2]["segments"][1]["image"], 448), media.box_image(40, 60, 300, 420))

    config = load_config("tiny")
    tok = Tokenizer(tokenizer.model_path, config.model.tokens)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    for doc in docs[1:]:
        example, row = one_document_row(tok, layout, doc)
        ids, n = list(example["tokens"]), len(example["tokens"])
        starts = [t for t, token in enumerate(ids) if token == layout.special["img"]]
        assert len(starts) == 2  # the prompt's image (or box image), then the target
        scored = list(np.flatnonzero(row["regression_mask"]))
        assert scored == list(range(starts[1], starts[1] + 4))  # [IMG] and <image> x 3 of the target's block
        assert list(np.flatnonzero(row["text_mask"])) == [n - 2]  # the document's end (EOS) alone


def test_a_bad_generation_line_is_named(photos, tmp_path):
    source = photos / "bad_gen.jsonl"
    source.write_text(json.dumps({"prompt": ["a", {"box": [1, 2, 3]}], "image": "coffee.jpg"}))
    with pytest.raises(records.SourceError, match=r"bad_gen.jsonl:1: a box is four integers"):
        write.convert("generation", str(source), str(tmp_path / "bad"))
    assert not list(tmp_path.glob("bad*.array_record"))


def test_an_unknown_chat_format_is_named():
    with pytest.raises(chat.ChatError, match="unknown chat format 'vicuna'; known: emu2_chat, emu_i"):
        chat.get("vicuna")
    assert config_lib.data_config().chat_format == "emu2_chat"


def test_the_digits_chat_task_asks_in_the_chat_format():
    from emu_jax.eval.tasks import make_task
    from emu_jax.generate.prompts import ImageInput
    task = make_task({"kind": "digits_chat", "limit": 2})
    query = task.queries()[1]
    before, image, after = task.prompt([], query)
    assert before == chat.EMU2_SYSTEM + " [USER]: " and isinstance(image, ImageInput)
    assert after == "what digit is this? [ASSISTANT]:" and query.meta["digit"] == 5
    results = [task.result(q, text) for q, text in zip(task.queries(), [" it is a zero.", "it is a six."])]
    assert task.score(results, "") == {"accuracy": 50.0}


def test_a_grounding_conversation_is_rendered_in_the_grounding_mode(photos, tmp_path, tokenizer):
    """An entry marked "grounding" becomes a document the pipeline renders with Emu2-Chat's grounding
    system message and cue, then the box reply (text in 0-224); the digits grounding task asks with
    the same prompt (its boxes in the world's words) and scores by box overlap."""
    source = photos / "grounding.json"
    source.write_text(json.dumps([{"image": "coffee.jpg", "grounding": True, "conversations": [
        {"from": "human", "value": "<image>where is the cup?"}, {"from": "gpt", "value": chat.box_text(10, 20, 200, 210)}]}]))
    paths, counts = write.convert("conversations", str(source), str(tmp_path / "grounding"))
    assert counts["grounding_conversations"] == 1
    doc = records.decode(records.ShardReader({paths[0]: 1})[0])
    config, tok = chat_setup(tokenizer)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    ids = list(pipeline.TokenizeDocument(tok, layout).map(("chat", 0, records.encode(doc)))["tokens"])
    before, after = chat.prompt(chat.get("emu2_chat", grounding=True), ["\0where is the cup?"]).split("\0")
    assert before.startswith(chat.EMU2_GROUNDING_SYSTEM) and after.endswith(" [ASSISTANT]:<grounding>")
    block = tokens_lib.image_block(layout.special, 4)
    assert ids == ([tok.bos_id] + tok.encode(before) + block + tok.encode(after + "[10, 20, 200, 210]")
                   + [tok.eos_id])

    from emu_jax.eval.tasks import make_task
    task = make_task({"kind": "digits_grounding", "limit": 2})
    query = task.queries()[0]
    text_before, image, text_after = task.prompt([], query)
    assert (text_before, text_after) == (before, after.replace("the cup", "the digit"))
    from emu_jax.data import digits
    assert query.target == digits.box_words(query.meta["box"])
    assert digits.words_box(query.target) is not None
    results = [{"question_id": q.key, "answer": a} for q, a in zip(task.queries(), [query.target,
                                                                                  "zero zero one one."])]
    scores = task.score(results, "")
    assert scores["accuracy"] == 50.0 and 30.0 < scores["mean_iou"] < 50.0


def test_digits_generation_asks_as_its_written_records_train_and_scores_where_the_digit_is(tmp_path, tokenizer):
    """The generation recipe's held-out examples, written as a user's JSONL and converted, render to
    the tokens and pixels the digits_generation task prompts with (up to the target's [IMG]); the
    subject's target is its source moved by half a canvas; the independent check passes the true
    canvases and fails them drawn in the opposite quadrant."""
    from emu_jax.data import digits, digits_gen
    from emu_jax.data import media
    from emu_jax.eval.tasks import make_task
    from emu_jax.generate import prompts
    written = digits_gen.write(str(tmp_path), "test")
    paths, counts = write.convert("generation", written[0], str(tmp_path / "gen"))
    assert (counts["documents"], counts["box_images"], counts["prompt_images"]) == (720, 360, 360)
    reader = records.ShardReader({path: records.count_records(path) for path in paths})
    config = load_config("tiny")
    tok = Tokenizer(tokenizer.model_path, config.model.tokens)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    task = make_task({"kind": "digits_generation", "limit": 10})
    queries = task.queries()
    for query, record in zip(queries[:2], (reader[0], reader[1])):
        rendered = pipeline.TokenizeDocument(tok, layout).map(("gen", 0, record))
        ids, images = prompts.encode(task.prompt([], query), tok, layout.special, 4, 4)
        assert ids == list(rendered["tokens"][:len(ids)]) and ids[-1] == layout.special["img"]
        assert np.array_equal(np.stack(images), rendered["images"][:1])  # the box image or the source canvas
    examples = digits_gen.examples("test", limit=10)
    assert [e.kind for e in examples[:2]] == ["grounded", "subject"]
    half = digits.CANVAS_SIZE // 2
    for e in examples:
        x1, y1, x2, y2 = e.box
        assert x1 // half == (x2 - 1) // half and y1 // half == (y2 - 1) // half  # inside one quadrant
        if e.kind == "subject":
            direction = e.prompt[1].rsplit(" ", 1)[1]
            dx, dy = digits.MOVES[direction]
            moved_back = np.roll(e.target, (-dy * half, -dx * half), axis=(0, 1))
            assert np.array_equal(moved_back, e.prompt[0][1])  # the source: the same digit, half a canvas back

    def score(canvases):
        results = []
        for query, canvas in zip(queries, canvases):
            results.append(task.image_result(query, media.decode_image(media.encode_png(canvas), 32), str(tmp_path)))
        return task.score(results, str(tmp_path))
    truth = score([e.target for e in examples])
    assert truth["crop_accuracy"] >= 90.0 and truth["in_box"] == 100.0 and truth["subject_in_box"] == 100.0
    flipped = score([e.target[::-1, ::-1] for e in examples])
    assert flipped["in_box"] == 0.0 and flipped["crop_accuracy"] <= 30.0


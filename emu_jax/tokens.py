"""Token layout shared by the data pipeline, the losses and generation.

Special tokens sit right after the sentencepiece vocabulary, in the order the released code adds
them to LLaMA's tokenizer (LLaMA's 32000 pieces, then [PAD]=32000, [IMG]=32001, ...; Emu2's
grounding markers and its 257 `<patch_index_NNNN>` tokens included). An image is the block
`[IMG] <image> x n [/IMG]`.

Videos follow the family's release. Emu1: each sampled frame is an image block. Emu2 (whose
tokens have `[VIDEO]` and `[gIMG]`): `[VIDEO]`, then per frame `[IMG] [gIMG] x m [/IMG]`, the frame
pooled to m tokens (64, also in Emu2-Chat, whose images have 256) placed at the `[gIMG]` positions.

Loss masks are aligned with the position that makes the prediction: mask[b, t] scores what the
model predicts at t about position t + 1 (same document only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the models, losses and decoding import this module without ml_collections
    import ml_collections

EMU1_SPECIALS = ("pad", "img", "img_end", "image")
EMU1_INSTRUCT = ("user", "assistant")
# `patch_index` is the first of EMU2_PATCH_INDICES ids (<patch_index_0000> .. <patch_index_0256>).
EMU2_SPECIALS = ("pad", "img", "img_end", "image", "gimg", "gimg_end", "eoc", "video", "grounding", "phrase",
                 "phrase_end", "object", "object_end", "delimiter", "rec", "patch_index")
EMU2_PATCH_INDICES = 257
EMU2_RESERVED = len(EMU2_SPECIALS) - 1 + EMU2_PATCH_INDICES  # 272 ids before Emu2-Chat's two
EMU2_CHAT = ("user", "assistant")
# Never text-loss targets: padding, the image-block tokens (the reference masks them all) and the
# video tokens (the model reads videos, it is never asked to write one).
NOT_TEXT_TARGETS = ("pad", "img", "img_end", "image", "video", "gimg")
TEXT_FORMS = {"pad": "[PAD]", "img": "[IMG]", "img_end": "[/IMG]", "image": "<image>", "gimg": "[gIMG]",
              "gimg_end": "[/gIMG]", "eoc": "[EOC]", "video": "[VIDEO]", "grounding": "<grounding>",
              "phrase": "<phrase>", "phrase_end": "</phrase>", "object": "<object>", "object_end": "</object>",
              "delimiter": "</delimiter_of_multi_objects/>", "rec": "<REC>", "user": "[USER]",
              "assistant": "[ASSISTANT]"}


def emu1_tokens(base: int = 32000, instruct: bool = False) -> tuple[ml_collections.ConfigDict, int]:
    """(special token ids, vocab size) of Emu1: 32004 ids, 32006 for the instruct model."""
    import ml_collections
    names = EMU1_SPECIALS + (EMU1_INSTRUCT if instruct else ())
    return ml_collections.ConfigDict({n: base + i for i, n in enumerate(names)}), base + len(names)


def emu2_token_ids(base: int = 32000, chat: bool = False) -> tuple[dict[str, int], int]:
    """(special token ids as a plain dict, vocab size) of Emu2: 32272 ids, 32274 for Emu2-Chat."""
    ids = {n: base + i for i, n in enumerate(EMU2_SPECIALS)}
    if chat:
        ids.update({n: base + EMU2_RESERVED + i for i, n in enumerate(EMU2_CHAT)})
    return ids, base + EMU2_RESERVED + (len(EMU2_CHAT) if chat else 0)


def emu2_tokens(base: int = 32000, chat: bool = False) -> tuple[ml_collections.ConfigDict, int]:
    """(special token ids, vocab size) of Emu2 as a config section (see `emu2_token_ids`)."""
    import ml_collections
    ids, vocab = emu2_token_ids(base, chat)
    return ml_collections.ConfigDict(ids), vocab


def text_forms(special) -> dict[str, int]:
    """{text form: id} of every special token in `special` (`patch_index` stands for its 257)."""
    forms = {TEXT_FORMS[name]: token_id for name, token_id in special.items() if name != "patch_index"}
    if "patch_index" in special:
        forms.update({f"<patch_index_{i:04d}>": special["patch_index"] + i for i in range(EMU2_PATCH_INDICES)})
    return forms


def image_block(special, visual_tokens: int) -> list[int]:
    return [special["img"]] + [special["image"]] * visual_tokens + [special["img_end"]]


def has_video_layout(special) -> bool:
    """Emu2's videos (`[VIDEO]` and `[gIMG]` frame blocks); Emu1's frames are plain image blocks."""
    return "video" in special and "gimg" in special


def video_block(special, frame_tokens: int, frames: int) -> list[int]:
    """A video of `frames` frames, `frame_tokens` each, as the family's release lays it out."""
    if not has_video_layout(special):
        return image_block(special, frame_tokens) * frames
    frame = [special["img"]] + [special["gimg"]] * frame_tokens + [special["img_end"]]
    return [special["video"]] + frame * frames


def frame_tokens(connector_config, visual_tokens: int) -> int:
    """Tokens per video frame: Emu2's pooled connector pools frames to its `video_pool_grid`
    squared; Emu1's connector (no video grid) reads a frame as an image."""
    grid = connector_config.get("video_pool_grid", 0)
    return grid * grid if grid else visual_tokens


def loss_masks(tokens: np.ndarray, segment_ids: np.ndarray, special) -> tuple[np.ndarray, np.ndarray]:
    """(text mask, regression mask), float32 [..., T], for tokens/segment_ids [..., T].

    text: the next token is a text token of the same document (not PAD, not an image-block or
    video token). regression: the next token is an `<image>` of the same document, i.e. the
    prediction at `[IMG]` and at each `<image>` but a block's last, paired with the next visual
    embedding. Video frames (`[gIMG]` blocks) are inputs only: neither mask scores a prediction
    of them (Emu2 never generates video; its image generation regresses `<image>` blocks)."""
    nxt, seg_now, seg_next = tokens[..., 1:], segment_ids[..., :-1], segment_ids[..., 1:]
    same_doc = (seg_now == seg_next) & (seg_now != 0)
    not_text = np.isin(nxt, [special[n] for n in NOT_TEXT_TARGETS if n in special])
    text = same_doc & ~not_text
    regression = same_doc & (nxt == special["image"])
    pad = np.zeros(tokens.shape[:-1] + (1,), bool)
    return (np.concatenate([text, pad], -1).astype(np.float32),
            np.concatenate([regression, pad], -1).astype(np.float32))

"""Token layout shared by the data pipeline, the losses and generation.

Special tokens sit right after the sentencepiece vocabulary, in the order of the released
checkpoints (LLaMA's 32000 pieces, then [PAD]=32000, [IMG]=32001, ...). An image or video frame
is the block `[IMG] <image> x n [/IMG]`.

Loss masks are aligned with the position that makes the prediction: mask[b, t] scores what the
model predicts at t about position t + 1 (same document only).
"""
from __future__ import annotations

import ml_collections
import numpy as np

EMU1_SPECIALS = ("pad", "img", "img_end", "image")
EMU1_INSTRUCT = ("user", "assistant")
EMU2_SPECIALS = ("pad", "img", "img_end", "image", "gimg", "gimg_end", "eoc", "video", "grounding")
EMU2_RESERVED = 272  # Emu2 adds 272 ids: the 9 above, phrase/object/REC markers and 257 patch indices
EMU2_CHAT = ("user", "assistant")
# Never text-loss targets: padding and the image-block tokens (the reference masks them all).
NOT_TEXT_TARGETS = ("pad", "img", "img_end", "image")
TEXT_FORMS = {"pad": "[PAD]", "img": "[IMG]", "img_end": "[/IMG]", "image": "<image>", "gimg": "[gIMG]",
              "gimg_end": "[/gIMG]", "eoc": "[EOC]", "video": "[VIDEO]", "grounding": "<grounding>",
              "user": "[USER]", "assistant": "[ASSISTANT]"}


def emu1_tokens(base: int = 32000, instruct: bool = False) -> tuple[ml_collections.ConfigDict, int]:
    """(special token ids, vocab size) of Emu1: 32004 ids, 32006 for the instruct model."""
    names = EMU1_SPECIALS + (EMU1_INSTRUCT if instruct else ())
    return ml_collections.ConfigDict({n: base + i for i, n in enumerate(names)}), base + len(names)


def emu2_tokens(base: int = 32000, chat: bool = False) -> tuple[ml_collections.ConfigDict, int]:
    """(special token ids, vocab size) of Emu2: 32272 ids, 32274 for Emu2-Chat."""
    ids = {n: base + i for i, n in enumerate(EMU2_SPECIALS)}
    if chat:
        ids.update({n: base + EMU2_RESERVED + i for i, n in enumerate(EMU2_CHAT)})
    return ml_collections.ConfigDict(ids), base + EMU2_RESERVED + (len(EMU2_CHAT) if chat else 0)


def image_block(special, visual_tokens: int) -> list[int]:
    return [special["img"]] + [special["image"]] * visual_tokens + [special["img_end"]]


def loss_masks(tokens: np.ndarray, segment_ids: np.ndarray, special) -> tuple[np.ndarray, np.ndarray]:
    """(text mask, regression mask), float32 [..., T], for tokens/segment_ids [..., T].

    text: the next token is a text token of the same document (not PAD, not an image-block token).
    regression: the next token is an `<image>` of the same document, i.e. the prediction at `[IMG]`
    and at each `<image>` but a block's last, paired with the next visual embedding."""
    nxt, seg_now, seg_next = tokens[..., 1:], segment_ids[..., :-1], segment_ids[..., 1:]
    same_doc = (seg_now == seg_next) & (seg_now != 0)
    not_text = np.isin(nxt, [special[n] for n in NOT_TEXT_TARGETS])
    text = same_doc & ~not_text
    regression = same_doc & (nxt == special["image"])
    pad = np.zeros(tokens.shape[:-1] + (1,), bool)
    return (np.concatenate([text, pad], -1).astype(np.float32),
            np.concatenate([regression, pad], -1).astype(np.float32))

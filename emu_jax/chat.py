"""Chat formats by name: how a conversation becomes the text a model reads, and which of it the
model learns to write. Shared by the training pipeline (chat documents) and generation (prompts).

A conversation is a system message (the format's own by default) and turns alternating user,
assistant, ...; a turn's content is text and media in order.

  emu2_chat  Emu2-Chat (Emu2/emu/chat.py): "{system} [USER]: {u1} [ASSISTANT]: {a1}</s>[USER]: {u2} ..."
             Grounding mode (a conversation marked `grounding`): its own system message, and each
             reply after " [ASSISTANT]:<grounding>", the cue the release's grounding prompt ends with;
             boxes as text `[x1, y1, x2, y2]` in 0-224 (`box_text`)
  emu_i      Emu-I (Emu1/inference.py): "{system} [USER]: {u1} [ASSISTANT]: {a1} [USER]: {u2} ...", stripped

Training (`pieces`) marks each reply and its turn end as targets and the rest as context; a
generation prompt (`prompt`) ends with the format's cue (" [ASSISTANT]:") for the model to continue.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

EMU2_SYSTEM = "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses."
EMU2_GROUNDING_SYSTEM = "You are a helpful assistant, dedicated to provide concise and efficient answers."
EMU_I_IMAGE_SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the "
                      "image after I provide it to you. Please answer my questions based on the given image.")
EMU_I_VIDEO_SYSTEM = ("You are a helpful assistant and you will be presented with a video consisting of multiple "
                      "chronological images: [IMG]ImageContent[/IMG]. You will be able to see the video after I "
                      "provide it to you. Please answer my questions based on the given video.")
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    system: str  # the default system message
    user_first: str  # before the first user message (after the system message)
    user_later: str  # before each later user message (after the previous reply's turn end)
    assistant: str  # before each reply
    turn_end: str  # after each reply: a target, so that the model learns to end its turn
    cue: str  # what a generation prompt ends with
    strip: bool = False  # the whole text is stripped (a format whose system message may be empty)
    grounding: ChatFormat | None = None  # the format's grounding mode, if it has one


FORMATS = {
    "emu2_chat": ChatFormat(EMU2_SYSTEM, " [USER]: ", "[USER]: ", " [ASSISTANT]: ", "</s>", " [ASSISTANT]:",
                            grounding=ChatFormat(EMU2_GROUNDING_SYSTEM, " [USER]: ", "[USER]: ",
                                                 " [ASSISTANT]:<grounding>", "</s>", " [ASSISTANT]:<grounding>")),
    "emu_i": ChatFormat("", " [USER]: ", " [USER]: ", " [ASSISTANT]: ", "", " [ASSISTANT]:", strip=True),
}


def get(name: str, grounding: bool = False) -> ChatFormat:
    if name not in FORMATS:
        raise ChatError(f"unknown chat format {name!r}; known: {', '.join(sorted(FORMATS))}")
    if grounding and FORMATS[name].grounding is None:
        raise ChatError(f"chat format {name!r} has no grounding mode")
    return FORMATS[name].grounding if grounding else FORMATS[name]


def box_text(x1: int, y1: int, x2: int, y2: int) -> str:
    """A box as Emu2-Chat reads and writes it in grounding mode: `[x1, y1, x2, y2]` in 0-224."""
    return f"[{x1}, {y1}, {x2}, {y2}]"


def boxes_in(text: str) -> list[tuple[int, int, int, int]]:
    """The `[x1, y1, x2, y2]` boxes of a grounding answer, in order."""
    return [tuple(map(int, m)) for m in re.findall(r"\[(\d+), (\d+), (\d+), (\d+)\]", text)]


def _check(roles: list[str]) -> None:
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected:
        raise ChatError(f"turns go user, assistant, user, ...; got {', '.join(roles) or 'none'}")


def pieces(fmt: ChatFormat, turns: list[tuple[str, list[Any]]], system: str | None = None) -> list[tuple[Any, bool]]:
    """[(role, content)] -> [(text or media item, is_target)] in reading order. The last reply has
    no turn end: the document's end (EOS, a target too) follows it."""
    _check([role for role, _ in turns])
    out = [(fmt.system if system is None else system, False)]
    for i, (role, content) in enumerate(turns):
        if role == "user":
            out += [(fmt.user_later if i else fmt.user_first, False)] + [(item, False) for item in content]
        else:
            last = i == len(turns) - 1  # a document's last reply ends with the document's EOS instead
            out += [(fmt.assistant, False)] + [(item, True) for item in content] + [(fmt.turn_end, True)] * (not last)
    out = [(item, target) for item, target in out if not (isinstance(item, str) and not item)]
    if fmt.strip and out and isinstance(out[0][0], str):
        out[0] = (out[0][0].lstrip(), out[0][1])
    return out


def prompt(fmt: ChatFormat, messages: list[str], system: str | None = None) -> str:
    """A generation prompt: messages alternate user, assistant, ... and end with the user's."""
    if len(messages) % 2 != 1:
        raise ChatError(f"{len(messages)} messages: they alternate user, assistant, ... and end with the user's")
    turns = [("user" if i % 2 == 0 else "assistant", [m]) for i, m in enumerate(messages)]
    text = "".join(item for item, _ in pieces(fmt, turns, system)) + fmt.cue
    return text.strip() if fmt.strip else text

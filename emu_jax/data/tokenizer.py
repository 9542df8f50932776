"""Sentencepiece tokenisation with Emu's special tokens at the ids the model config gives them.

The sentencepiece model is LLaMA's `tokenizer.model` for real runs (the release's own copy, in
its `llama_config` directories, is a supported one), or one trained on
the embedded corpus (`digits.train_sentencepiece`). Special tokens written in text ("[IMG]", "<image>", "[USER]", "</s>", ...)
map to their ids whatever the sentencepiece vocabulary holds; the sentencepiece vocabulary must
end below the first special id.

Text is split at special tokens and each piece between them is encoded on its own, with
sentencepiece's leading "▁", as the release's tokenizer (transformers' LlamaTokenizer with
Emu's added tokens) does: `" [USER]: "` is `▁▁ [USER] ▁: ▁`, token for token the release's ids.
"""
from __future__ import annotations

import os
import re

import sentencepiece as spm

from emu_jax.tokens import text_forms


class Tokenizer:
    def __init__(self, model_path: str, special):
        self.model_path = model_path
        with open(model_path, "rb") as f:
            self.sp = spm.SentencePieceProcessor(model_proto=f.read())
        self.special = special
        first_special = min(special.values())
        if self.sp.vocab_size() > first_special:
            raise ValueError(f"{model_path}: sentencepiece vocabulary has {self.sp.vocab_size()} pieces, which "
                             f"overlaps the special token ids starting at {first_special}")
        # sentencepiece's own control tokens (<s>, </s>, <unk>) are matched in text too, as the
        # release's tokenizer matches them; sentencepiece itself would spell them out.
        controls = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if i >= 0}
        self._by_text = controls | text_forms(special)
        self._by_id = {token_id: text for text, token_id in text_forms(special).items()}
        # longest first: a text form that starts another (none today) must not cut it short
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._by_text, key=len, reverse=True))
                                 + ")")

    def __getstate__(self):  # sentencepiece processors do not pickle; grain workers reload the file
        return {"model_path": self.model_path, "special": self.special}

    def __setstate__(self, state):
        self.__init__(state["model_path"], state["special"])

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._split.split(text):
            if piece in self._by_text:
                ids.append(self._by_text[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text for ids; special tokens are dropped (or written in their text form)."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._by_id:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self._by_id[i])
            elif 0 <= i < self.sp.vocab_size():
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


def load_tokenizer(data_config, special) -> Tokenizer:
    """`data.tokenizer` (a sentencepiece model; `{data_dir}` in it expanded) with the model's
    special tokens; the embedded digits world is built first when its tokenizer is asked for and
    missing."""
    data_dir = os.path.expanduser(data_config.data_dir)
    path = os.path.expanduser(data_config.tokenizer.replace("{data_dir}", data_dir))
    if not os.path.exists(path) and "digits_world" in data_config.tokenizer:
        from emu_jax.data import digits
        digits.build(data_dir)
    return Tokenizer(path, special)

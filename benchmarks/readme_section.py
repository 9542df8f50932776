"""Writes a generated table into the README between its `<!-- NAME:begin -->` / `<!-- NAME:end -->`
markers (the benchmark scripts' one way of putting figures there)."""
from __future__ import annotations

import pathlib


def rewrite(readme: str | pathlib.Path, name: str, markdown: str) -> None:
    readme = pathlib.Path(readme)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers")
    before, rest = text.split(begin, 1)
    readme.write_text(before + begin + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])

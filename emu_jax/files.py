"""Reading the JSON files users hand us (annotations, results, manual downloads, a sweep's own
records): what is wrong with one is said in one line naming the file."""
from __future__ import annotations

import json


class FormatError(ValueError):
    """A file that cannot be read or is not in the format it should be."""


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e

"""Held-out images of a run's own data: the first images of the eval sources' documents."""
from __future__ import annotations

import hashlib

import numpy as np

from emu_jax.data import media, pipeline, records


def images(data_config, image_size: int, count: int, require_meta: str = "") -> list[tuple[np.ndarray, dict]]:
    """Up to `count` distinct images (uint8 [S, S, 3]) that begin documents of the eval sources, with
    their documents' metadata (only documents whose metadata has `require_meta`, when given)."""
    docs = pipeline.documents(data_config, data_config.eval_sources, shuffle=False, process_index=0, process_count=1)
    found, seen = [], set()
    for i in range(len(docs)):
        try:
            doc = records.decode(docs[i][2])
        except records.RecordError:
            continue
        first = doc["segments"][0]
        if "image" not in first or (require_meta and require_meta not in doc["meta"]):
            continue
        digest = hashlib.sha1(first["image"]).digest()
        if digest in seen:
            continue
        seen.add(digest)
        found.append((media.decode_image(first["image"], image_size), doc["meta"]))
        if len(found) == count:
            break
    return found

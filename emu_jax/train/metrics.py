"""Training metrics: JSONL and TensorBoard event files in the workdir (process 0 only)."""
from __future__ import annotations

import json
import os


class MetricsWriteError(OSError):
    """metrics.jsonl could not be written (a full disk); the message names the file and the cause."""


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self._path = os.path.join(workdir, "metrics.jsonl")
            self._jsonl = open(self._path, "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._line({"step": step, **values})
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def text(self, step: int, tag: str, value: str) -> None:
        if not self.enabled:
            return
        self._line({"step": step, tag: value})
        self._tb.add_text(tag, value, step)

    def _line(self, row: dict) -> None:
        try:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        except OSError as e:
            raise MetricsWriteError(f"writing metrics to {self._path} failed: {e.strerror or e}") from e

    def image(self, step: int, tag: str, pixels) -> None:
        """uint8 [H, W, 3]."""
        if self.enabled:
            self._tb.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

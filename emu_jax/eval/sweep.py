"""Evaluation sweeps: checkpoints x tasks x shots x demonstration choice x decoding settings, run
unattended and resumable.

Each cell writes, under `<out>/cells/<checkpoint>/<task>/<shots>shot[-<choice>]-<decoding>/`, its predictions as
the official result JSON (`results.json`; text-to-image cells also their PNGs) and then
`score.json`; both atomically, so a cell with a `score.json` is finished and a re-run (or a killed
sweep started again) skips it. Demonstrations come from the task's train pool, chosen by RICES
(visual-encoder features cached under `<out>/features/`) or seeded random picks. At the end:
`results.csv`, `results.md` (one row per cell) and plots (metric vs shots per checkpoint and task;
sample grids for text-to-image cells).

Multi-process (a checkpoint sharded over several hosts, `config.distributed` as in training): every
process runs every cell in step; process 0 writes the results, the others a private copy under
`<out>/processes/<i>/`. A Ctrl-C to any process stops them all after the same generation batch
(`parallel.interrupts`).

A checkpoint entry names its model config, its checkpoint (and decoder checkpoint, and a LoRA run's
checkpoints as "adapter" on the checkpoint's weights) and optional config overrides as a nested dict, e.g. {"mesh": {"fsdp": 8}} to shard a checkpoint that does not fit one device over
the same mesh code as training.
"""
from __future__ import annotations

import csv
import dataclasses
import os

import jax
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from emu_jax import config_lib
from emu_jax.eval import fid, rices
from emu_jax.eval.evaluators import answer, demonstrations, process_out
from emu_jax.eval.tasks import checked_task, make_task, task_class, write_json
from emu_jax.files import read_json
from emu_jax.parallel.interrupts import agreed, agreed_interrupts


@dataclasses.dataclass(frozen=True)
class Cell:
    checkpoint: str
    task: str
    shots: int
    decoding: str
    demonstrations: str = "none"  # "rices" | "random"; "none" for zero-shot cells

    @property
    def path(self) -> str:
        shots = f"{self.shots}shot" + (f"-{self.demonstrations}" if self.shots else "")
        return os.path.join(self.checkpoint, self.task, f"{shots}-{self.decoding}")


def cells(sweep) -> list[Cell]:
    """The grid (a task entry's own "shots" replaces the sweep's); text-to-image runs zero-shot."""
    out = []
    for checkpoint in sweep.checkpoints:
        for task, spec in sweep.tasks.items():
            image_task = task_class(spec["kind"]).kind == "image"
            for shots in spec.get("shots", sweep.shots):
                if image_task and shots:
                    continue
                choices = ("none",) if not shots else demonstration_choices(sweep)
                for choice in choices:
                    for decoding in sweep.decodings:
                        out.append(Cell(checkpoint, task, int(shots), decoding, choice))
    return out


def demonstration_choices(sweep) -> tuple[str, ...]:
    """sweep.demonstrations: "rices", "random", or several (comma-separated or a tuple)."""
    choices = sweep.demonstrations
    return tuple(c.strip() for c in choices.split(",")) if isinstance(choices, str) else tuple(choices)


class SweepConfigError(ValueError):
    """A sweep config that cannot run to its end, named before the first cell runs."""


def check(sweep) -> None:
    """What a cell would otherwise meet hours into a sweep, checked before the first one: every
    checkpoint entry's model config, overrides and checkpoint folders; every decoding's settings over
    every checkpoint's config; every task's kind, options and files; a decoder for every checkpoint a
    text-to-image task runs on; the demonstration choices a few-shot cell uses."""
    from emu_jax.checkpoint import latest_step
    from emu_jax.generate.generator import text_settings
    if not sweep.checkpoints:
        raise SweepConfigError("config.checkpoints names no checkpoint")
    for name, entry in sweep.checkpoints.items():
        where = f"config.checkpoints.{name}"
        config = _model_config(entry, where)
        for key in ("checkpoint", "decoder", "adapter"):
            if key == "checkpoint" or entry.get(key):
                try:
                    latest_step(entry[key])
                except FileNotFoundError as e:
                    raise SweepConfigError(f"{where}.{key}: {e.args[0]}") from None
        for decoding, settings in sweep.decodings.items():
            try:
                text_settings(config_lib.with_overrides(config, {f"generate.{k}": v for k, v in settings.items()})
                              .generate, ())
            except (KeyError, ValueError) as e:
                raise SweepConfigError(f"config.decodings.{decoding} (over {where}): {e.args[0]}") from None
    for name, spec in sweep.tasks.items():
        task = checked_task(spec, f"config.tasks.{name}")
        without_decoder = [c for c, entry in sweep.checkpoints.items() if not entry.get("decoder")]
        if task.kind == "image" and without_decoder:
            raise SweepConfigError(f"config.tasks.{name} ({spec['kind']}) draws images: config.checkpoints."
                                   f"{without_decoder[0]} names no decoder (a visual decoder checkpoint)")
    unknown = [c for c in demonstration_choices(sweep) if c not in rices.STRATEGIES]
    if unknown and any(cell.shots for cell in cells(sweep)):
        raise SweepConfigError(f"config.demonstrations: {unknown[0]!r} is not one of {rices.STRATEGIES}")


def _model_config(entry, where: str):
    if "config" not in entry or "checkpoint" not in entry:
        raise SweepConfigError(f"{where} needs a model config and a checkpoint (config=..., checkpoint=...)")
    path = entry.config.partition(":")[0]
    if not os.path.isfile(path):
        raise SweepConfigError(f"{where}.config: no config file {path}")
    try:
        return config_lib.with_overrides(config_lib.load(entry.config), dict(flatten(entry.get("overrides", {}))))
    except KeyError as e:
        raise SweepConfigError(f"{where}.overrides: {e.args[0]}") from None


def process_zero(flags) -> bool:
    return bool(flags[0])


class Runner:
    """Loads each checkpoint once, when its first unfinished cell needs it."""

    def __init__(self, sweep):
        self.sweep, self.out = sweep, process_out(sweep.out)
        self._generator, self._generator_name, self._tasks = None, None, {}

    def generator(self, name: str):
        if self._generator_name != name:
            from emu_jax.generate.generator import Generator
            entry = self.sweep.checkpoints[name]
            overrides = dict(flatten(entry.get("overrides", {})))
            config = config_lib.with_overrides(config_lib.load(entry.config), overrides)
            logging.info("loading checkpoint %s from %s", name, entry.checkpoint)
            self._generator = Generator.from_checkpoints(config, entry.checkpoint, entry.get("decoder", ""),
                                                         adapter=entry.get("adapter", ""))
            self._generator.base_config, self._generator_name = config, name
        return self._generator

    def task(self, name: str):
        if name not in self._tasks:
            spec = dict(self.sweep.tasks[name])
            spec.pop("shots", None)
            if "image_size" not in spec and self._generator is not None:  # the encoder's input size
                spec["image_size"] = self._generator.image_size
            self._tasks[name] = make_task(spec)
        return self._tasks[name]

    def features(self, generator):
        return fid.encoder_features(generator.model, generator.params)

    def demonstrations(self, cell: Cell, task, queries, pool) -> list[list]:
        if cell.shots == 0:
            return [[] for _ in queries]
        query_features = pool_features = None
        if cell.demonstrations == "rices":
            feature_dir = os.path.join(self.out, "features", cell.checkpoint)
            encode = self.features(self.generator(cell.checkpoint))
            pool_features = rices.cached_features(os.path.join(feature_dir, f"{cell.task}_pool.npz"),
                                                  lambda: np.stack([e.images[0] for e in pool]), encode, len(pool),
                                                  agree=agreed)
            query_features = rices.cached_features(os.path.join(feature_dir, f"{cell.task}_queries.npz"),
                                                   lambda: np.stack([q.images[0] for q in queries]), encode,
                                                   len(queries), agree=agreed)
        return demonstrations(task, queries, pool, cell.demonstrations, cell.shots, self.sweep.seed,
                              query_features, pool_features)

    def run_cell(self, cell: Cell) -> dict:
        cell_dir = os.path.join(self.out, "cells", cell.path)
        score_path = os.path.join(cell_dir, "score.json")
        if agreed(os.path.exists(score_path), decide=process_zero):  # the others' copies may lack it
            return read_json(score_path) if os.path.exists(score_path) else {}
        generator = self.generator(cell.checkpoint)
        generator.config = config_lib.with_overrides(
            generator.base_config, {f"generate.{k}": v for k, v in self.sweep.decodings[cell.decoding].items()})
        task = self.task(cell.task)
        queries = task.queries()
        pool = task.pool() if cell.shots else []
        demos = self.demonstrations(cell, task, queries, pool)
        os.makedirs(cell_dir, exist_ok=True)
        results = answer(task, generator, queries, demos, cell_dir,
                         lambda batches: tqdm(batches, desc=f"{cell.path} ({len(queries)} examples)", unit="batch",
                                              leave=False))
        write_json(os.path.join(cell_dir, "results.json"), results)
        score = dict(task.score(results, cell_dir, features=self.features(generator)), examples=len(results))
        write_json(score_path, score)
        return score


def flatten(tree, prefix: str = ""):
    """{"mesh": {"fsdp": 8}} -> ("mesh.fsdp", 8) pairs (config overrides as a nested dict)."""
    for key, value in tree.items():
        if hasattr(value, "items"):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run(sweep) -> list[dict]:
    """Every cell of the grid (finished ones read back), then the tables and plots."""
    check(sweep)
    grid = cells(sweep)
    runner = Runner(sweep)
    rows = []
    with agreed_interrupts():  # Ctrl-C on any process stops them all after a generation batch
        for cell in tqdm(grid, desc="cells", unit="cell", disable=jax.process_index() != 0):
            score = runner.run_cell(cell)
            rows.append(dict(dataclasses.asdict(cell), **score))
    if jax.process_index() == 0:
        write_tables(rows, sweep.out)
        plot(rows, sweep.out)
    return rows


def write_tables(rows: list[dict], out: str) -> None:
    keys = ["checkpoint", "task", "shots", "demonstrations", "decoding"]
    metrics = sorted({k for r in rows for k in r} - set(keys) - {"examples"}) + ["examples"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys + metrics)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys + metrics) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys + metrics) + " |" for r in rows]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows: list[dict], out: str) -> None:
    """metric vs shots (a line per checkpoint, demonstration choice and decoding; zero-shot cells start
    every line) per task and metric; a sample grid per
    text-to-image cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emu_jax.eval.image_grid import grid, save_png
    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        for metric in sorted({k for r in task_rows for k in r} - {"checkpoint", "task", "shots", "decoding",
                                                                   "demonstrations", "examples"}):
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            choices = sorted({r["demonstrations"] for r in task_rows if r["shots"]}) or ["none"]
            for checkpoint, decoding in sorted({(r["checkpoint"], r["decoding"]) for r in task_rows}):
                for choice in choices:
                    points = sorted((r["shots"], r[metric]) for r in task_rows
                                    if (r["checkpoint"], r["decoding"]) == (checkpoint, decoding) and metric in r
                                    and r["demonstrations"] in (choice, "none"))
                    ax.plot(*zip(*points), marker="o", label=" / ".join((checkpoint, choice, decoding)))
            ax.set(xlabel="shots", ylabel=metric, title=task)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(plot_dir, f"{task}_{metric}.png"), dpi=100)
            plt.close(fig)
    for r in rows:
        cell_dir = os.path.join(out, "cells", Cell(r["checkpoint"], r["task"], r["shots"], r["decoding"],
                                                   r["demonstrations"]).path)
        files = sorted(f for f in os.listdir(cell_dir) if f.endswith(".png"))[:16] if os.path.isdir(cell_dir) else []
        if files:
            images = np.stack([np.asarray(Image.open(os.path.join(cell_dir, f)).convert("RGB")) for f in files])
            per_row = min(8, len(images))
            save_png(grid([images[i:i + per_row] for i in range(0, len(images) // per_row * per_row, per_row)]),
                     os.path.join(plot_dir, f"{r['checkpoint']}_{r['task']}_samples.png"))

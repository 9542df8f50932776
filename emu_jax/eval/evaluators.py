"""Evaluators by name: one system for the end of training, periodic evaluation and the sweep.

A run's `config.evals` maps names to evaluators, each `{type, every, ...its options}`. The trainer
runs each every `every` steps (0: never during training) and, where `final`, at the end of training;
a metric `m` of evaluator `name` is logged as `eval/<name>/<m>`. Types:

  task             an evaluation task of `eval/tasks.py` (its entry under `task`: {"kind": ..., its
                   arguments}) answered by the generator with the `decoding` overrides of
                   `config.generate`, `shots` demonstrations drawn at random from its train pool
                   (0: zero-shot), scored by the task; the first `texts` answers are logged, and
                   the official results file is written under `<workdir>/evals/<name>/<step>/`.
                   The sweep's cells answer and score through the same functions. Tasks that
                   ask for images need `decoder`: a visual decoder's checkpoint.
  captions         greedy captions of the first `count` images of the eval sources (any dataset)
  reconstructions  a PNG grid (and TensorBoard image) of `count` held-out images above what the
                   model makes of them (the visual decoder's stages)
  recognisability  the share of `count` held-out digits whose reconstruction an independent
                   classifier labels with its digit (eval/recognisability.py), in percent
  canvas_reconstructions  the same share and the ink's place for `count` held-out generation
                   canvases (data/digits_gen.py), with a grid of 8
  latent_std       the standard deviation of the VAE's latent means over `count` held-out images:
                   a decoder stage wants `model.vae.scaling_factor` near its inverse

What is evaluated (the "subject") is the training task: `config`, `model`, and as the types need
them `tokenizer`, `reconstruct(params, uint8 images)` and `latents(params, uint8 images)`.
Multi-process: every process runs every evaluator in step (the parameters may span their devices);
process 0 writes the logs and files, the others a private copy of the files.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from emu_jax.eval import held_out, image_grid, recognisability, rices
from emu_jax.eval.tasks import Example, Task, TaskConfigError, checked_task, make_task, write_json


@dataclasses.dataclass
class Context:
    subject: Any  # the training task: config, model, tokenizer / reconstruct / latents
    params: Any
    step: int
    writer: Any  # scalars(step, dict), text(step, tag, str), image(step, tag, uint8 HWC); process 0 writes
    workdir: str
    mesh: Any = None


class EvalConfigError(ValueError):
    pass


EVALUATORS: dict[str, Callable[[Context, str, Any], dict]] = {}


def evaluator(name: str):
    def register(fn):
        EVALUATORS[name] = fn
        return fn
    return register


def check(evals) -> None:
    """Unknown evaluator types, and task entries that cannot run (`tasks.checked_task`; a task that
    draws images without a decoder), fail when the run starts, not after its last step."""
    for name, entry in evals.items():
        if entry.get("type") not in EVALUATORS:
            raise EvalConfigError(f"config.evals.{name}: unknown type {entry.get('type')!r}; known: "
                             f"{', '.join(sorted(EVALUATORS))}")
        if entry.type != "task":
            continue
        try:
            task = checked_task(entry.get("task", {}), f"config.evals.{name}.task")
        except TaskConfigError as e:
            raise EvalConfigError(str(e)) from None
        if task.kind == "image" and not entry.get("decoder"):
            raise EvalConfigError(f"config.evals.{name}: its task ({entry.task.kind}) draws images: give decoder "
                                  f"(a visual decoder's checkpoint)")
        if entry.get("decoder"):
            from emu_jax.checkpoint import latest_step
            try:
                latest_step(entry.decoder)
            except FileNotFoundError as e:
                raise EvalConfigError(f"config.evals.{name}.decoder: {e}") from None


def due(evals, step: int, final: bool) -> list[str]:
    """The evaluators to run after `step`: those due every `every` steps, or at the end those marked `final`."""
    return [name for name, entry in evals.items() if (entry.final if final else entry.every and step % entry.every == 0)]


def run(evals, ctx: Context, final: bool = False) -> dict:
    """Runs the due evaluators; returns and logs (under `eval/`) their metrics as `<name>/<metric>`."""
    out = {}
    for name in due(evals, ctx.step, final):
        metrics = EVALUATORS[evals[name].type](ctx, name, evals[name])
        out.update({f"{name}/{key}": value for key, value in metrics.items()})
    if out:
        ctx.writer.scalars(ctx.step, {f"eval/{key}": value for key, value in out.items()})
    return out


def process_out(out: str) -> str:
    """Where this process writes: `out` for process 0, a private copy below it for the others (they
    compute the same results and read back what they wrote, e.g. text-to-image PNGs)."""
    index = jax.process_index()
    return out if index == 0 else os.path.join(out, "processes", str(index))


# ----------------------------------------------------------------------------- answering a task

def demonstrations(task: Task, queries: list[Example], pool: list[Example], strategy: str, shots: int, seed: int,
                   query_features=None, pool_features=None) -> list[list[Example]]:
    """Per query, `shots` pool examples as the task shows them, from the part of the pool the task
    allows for that query (`random`: seeded picks; `rices`: nearest by the features given)."""
    if shots == 0:
        return [[] for _ in queries]
    if query_features is None:
        query_features, pool_features = np.zeros((len(queries), 1)), np.zeros((len(pool), 1))
    chosen = []
    for i, query in enumerate(queries):
        allowed = task.demonstration_pool(query)
        allowed = np.arange(len(pool)) if allowed is None else allowed
        picks = rices.demonstrations(strategy, shots, query_features[i:i + 1], pool_features[allowed],
                                     seed=seed * 100003 + i)[0]
        chosen.append([task.demonstration(pool[allowed[j]], query) for j in picks])
    return chosen


def answer(task: Task, generator, queries: list[Example], demos: list[list[Example]], out_dir: str,
           progress: Callable = lambda batches: batches) -> list[dict]:
    """The generator's answers as the task's official result entries (text-to-image tasks write
    their PNGs into `out_dir`), batched by `generate.batch_size`."""
    results, batch = [], generator.config.generate.batch_size
    for start in progress(range(0, len(queries), batch)):
        rows = queries[start:start + batch]
        outputs = generator.generate([task.prompt(d, q) for d, q in zip(demos[start:start + batch], rows)])
        results += [task.image_result(query, output.images[0], out_dir) if task.kind == "image"
                    else task.result(query, output.text) for query, output in zip(rows, outputs)]
    return results


def generator_for(ctx: Context, decoding=None, decoder: str = ""):
    """A generator over the parameters in hand (the run's mesh), `decoding` overriding `generate.*`;
    `decoder`: a visual decoder's checkpoint that draws the images asked for (without one, images
    stay regressed embeddings)."""
    from emu_jax import config_lib
    from emu_jax.generate.generator import Generator, restore_decoder, unscanned_llm
    config = config_lib.with_overrides(ctx.subject.config, {f"generate.{k}": v for k, v in (decoding or {}).items()})
    decoder_params = restore_decoder(config, decoder, ctx.mesh) if decoder else None
    config, params = unscanned_llm(config, ctx.params, release=False)  # the run goes on with its stacked params
    return Generator(config, params, ctx.subject.tokenizer, decoder_params=decoder_params, mesh=ctx.mesh)


@evaluator("task")
def task_evaluator(ctx: Context, name: str, entry) -> dict:
    task = make_task({"image_size": ctx.subject.config.model.vit.image_size} | entry.task.to_dict())
    shots = entry.get("shots", 0)
    queries = task.queries()
    pool = task.pool() if shots else []
    demos = demonstrations(task, queries, pool, "random", shots, ctx.subject.config.seed)
    out_dir = process_out(os.path.join(ctx.workdir, "evals", name, str(ctx.step)))
    os.makedirs(out_dir, exist_ok=True)
    results = answer(task, generator_for(ctx, entry.get("decoding"), entry.get("decoder", "")), queries, demos, out_dir)
    write_json(os.path.join(out_dir, "results.json"), results)
    for query, result in list(zip(queries, results))[:entry.get("texts", 0)]:
        ctx.writer.text(ctx.step, name, f"{query.target or query.question}: {result.get(task.answer_field, '')}")
    return task.score(results, out_dir)


# ----------------------------------------------------------------------------- held-out images

@evaluator("captions")
def captions_evaluator(ctx: Context, name: str, entry) -> dict:
    from emu_jax.generate.prompts import ImageInput
    config = ctx.subject.config
    images = held_out.images(config.data, config.model.vit.image_size, entry.count)
    outputs = generator_for(ctx, {"strategy": "greedy", "max_new_tokens": entry.get("max_new_tokens", 12)}).generate(
        [[ImageInput(pixels)] for pixels, _ in images])
    for i, output in enumerate(outputs):
        ctx.writer.text(ctx.step, f"{name}_{i}", output.text)
    return {}


def _digits(ctx: Context, count: int) -> tuple[np.ndarray, list[int]]:
    found = held_out.images(ctx.subject.config.data, ctx.subject.model.image_size, count, require_meta="digit")
    return np.stack([pixels for pixels, _ in found]), [int(meta["digit"]) for _, meta in found]


@evaluator("reconstructions")
def reconstructions_evaluator(ctx: Context, name: str, entry) -> dict:
    images, _ = _digits(ctx, entry.count)
    grid = image_grid.grid([images, ctx.subject.reconstruct(ctx.params, images)])
    if ctx.writer.enabled:
        image_grid.save_png(grid, os.path.join(ctx.workdir, "samples", f"{name}_{ctx.step:07d}.png"))
    ctx.writer.image(ctx.step, name, grid)
    return {}


@evaluator("recognisability")
def recognisability_evaluator(ctx: Context, name: str, entry) -> dict:
    images, digits = _digits(ctx, entry.count)
    outputs = np.concatenate([ctx.subject.reconstruct(ctx.params, images[i:i + 64]) for i in range(0, len(images), 64)])
    return {"recognisability": 100.0 * recognisability.digit_accuracy(outputs, digits)}


@evaluator("canvas_reconstructions")
def canvas_reconstructions_evaluator(ctx: Context, name: str, entry) -> dict:
    """The generation canvases of `count` held-out digits (data/digits_gen.py) as the decoder stage
    redraws them, scored as DigitsGeneration scores generated ones; a grid of the first 8 is saved."""
    from emu_jax.data import digits, digits_gen, media
    examples = [e for e in digits_gen.examples("test", limit=entry.count) if e.kind == "grounded"]
    size = ctx.subject.model.image_size
    images = np.stack([media.decode_image(media.encode_png(e.target), size) for e in examples])
    outputs = np.concatenate([ctx.subject.reconstruct(ctx.params, images[i:i + 64]) for i in range(0, len(images), 64)])
    grid = image_grid.grid([images[:8], outputs[:8]])
    if ctx.writer.enabled:
        image_grid.save_png(grid, os.path.join(ctx.workdir, "samples", f"{name}_{ctx.step:07d}.png"))
    found = recognisability.placement(outputs, [e.box for e in examples], [e.digit for e in examples],
                                      digits.CANVAS_SIZE)
    return {key: 100.0 * value for key, value in found.items()}


@evaluator("latent_std")
def latent_std_evaluator(ctx: Context, name: str, entry) -> dict:
    images, _ = _digits(ctx, entry.count)
    return {"latent_std": float(np.std(ctx.subject.latents(ctx.params, images)))}

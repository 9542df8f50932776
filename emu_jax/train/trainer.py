"""The training loop, top to bottom: start-up -> mesh -> model and shardings -> optimizer -> input
pipeline -> state (restored or initialised sharded) -> jitted steps -> loop -> final evaluation.

    python -m emu_jax.train --config=configs/tiny.py --workdir=/tmp/emu_tiny

A workdir that holds checkpoints resumes from the latest finished one (parameters, optimizer
state, data-iterator position), so a preempted or killed run continues exactly.
"""
from __future__ import annotations

import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from emu_jax.data import pipeline
from emu_jax.data.tokenizer import Tokenizer
from emu_jax.eval import captioning
from emu_jax.models.emu import build_model, example_inputs
from emu_jax.parallel import mesh as mesh_lib
from emu_jax.train import flops as flops_lib
from emu_jax.train.checkpoint import Checkpointer, abstract_with_shardings, restore_params
from emu_jax.train.metrics import MetricsWriter
from emu_jax.train.optimizer import make_optimizer
from emu_jax.train.step import TrainState, make_eval_step, make_train_step


class Preemption:
    """Turns SIGTERM into a flag the loop checks, so the run saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *unused):
        self.requested = True


def abstract_model(model, mesh, rules):
    """(abstract params as ShapeDtypeStructs, their NamedShardings) without allocating anything."""
    inputs = example_inputs(model)
    boxed = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw), inputs)["params"]
    return mesh_lib.strip_boxes(boxed), mesh_lib.logical_shardings(boxed, mesh, rules)


def init_params(model, shardings, seed: int):
    """Parameters created already sharded: each device computes only its own shards."""
    inputs = example_inputs(model)

    def init(key):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
        return nn.unbox(model.init(key, **zeros)["params"])

    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def load_towers(params, init_from, abstract, shardings):
    """Replaces whole towers (e.g. "vit", "llm") with those of converted or trained checkpoints;
    towers given an empty path keep their initialisation."""
    for tower, path in init_from.items():
        if not path:
            continue
        if tower not in params:
            raise KeyError(f"train.init_from names tower {tower!r}; the model has {sorted(params)}")
        target = {tower: abstract_with_shardings(abstract[tower], shardings[tower])}
        params = dict(params, **restore_params(path, target))
    return params


def state_shardings(optimizer, abstract_params, param_shardings, mesh):
    abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a frozen parameter's empty state)
    opt_shardings = optax.tree_map_params(optimizer.tx, lambda p, s: p if masked(p) else s, abstract_opt,
                                          param_shardings, transform_non_params=lambda _: mesh_lib.replicated(mesh),
                                          is_leaf=masked)
    scalar = mesh_lib.replicated(mesh)
    return abstract_opt, TrainState(step=scalar, params=param_shardings, opt_state=opt_shardings,
                                    skipped_updates=scalar)


def held_out_loss(eval_step, params, config, model, mesh) -> dict:
    """Mean held-out metrics over a fixed number of eval batches (same pipeline, no shuffling)."""
    data = pipeline.make_dataset(config.data, config.model, model.visual_tokens_per_image, split="eval",
                                 worker_count=0)
    totals, count = {}, 0
    for batch, _ in zip(data, range(config.train.eval_batches)):
        metrics = jax.device_get(eval_step(params, pipeline.to_global(batch, mesh)))
        for key in ("loss", "text_loss", "regression_loss"):
            totals[key] = totals.get(key, 0.0) + float(metrics[key])
        count += 1
    return {f"eval/{k}": v / max(count, 1) for k, v in totals.items()}


FINAL_EVALS = {"digit_captions": captioning.digit_caption_accuracy}


def train(config, workdir: str) -> dict:
    tc = config.train
    # ---------------------------------------------------------------- start-up
    mesh_lib.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    writer = MetricsWriter(workdir, enabled=is_main)
    preemption = Preemption()

    # ---------------------------------------------------------------- mesh
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch(config.data.global_batch_size, mesh, tc.grad_accum_steps)
    rules = config.mesh.rules
    batch_sharding, replicated = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ------------------------------------------------------------ model, optimizer, shardings
        model = build_model(config.model)
        abstract_params, param_shardings = abstract_model(model, mesh, rules)
        optimizer = make_optimizer(config.optimizer, abstract_params, tc.steps)
        abstract_opt, shardings = state_shardings(optimizer, abstract_params, param_shardings, mesh)

        # ------------------------------------------------------------ input pipeline
        train_iter = iter(pipeline.make_dataset(config.data, config.model, model.visual_tokens_per_image))

        # ------------------------------------------------------------ state: resume or initialise
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                                    every=tc.checkpoint_every, async_save=tc.async_checkpoints)
        latest = checkpointer.latest_step()
        if latest is not None:
            params, opt_state, meta = checkpointer.restore(
                latest, abstract_with_shardings(abstract_params, param_shardings),
                abstract_with_shardings(abstract_opt, shardings.opt_state), train_iter)
            skipped = meta["skipped_updates"]
        else:
            params = load_towers(init_params(model, param_shardings, config.seed), tc.init_from, abstract_params,
                                 param_shardings)
            opt_state = jax.jit(optimizer.tx.init, out_shardings=shardings.opt_state)(params)
            latest, skipped = 0, 0
        state = TrainState(step=jax.device_put(jnp.int32(latest), replicated), params=params, opt_state=opt_state,
                           skipped_updates=jax.device_put(jnp.int32(skipped), replicated))

        # ------------------------------------------------------------ steps
        train_step = jax.jit(make_train_step(model, optimizer, config.loss, tc.grad_accum_steps),
                             in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                             donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, config.loss), in_shardings=(param_shardings, batch_sharding),
                            out_shardings=replicated)
        vit_trainable = not all(jax.tree.leaves(optimizer.frozen["vit"]))
        step_flops = flops_lib.step_flops(abstract_params, config.model, config.data.global_batch_size,
                                          config.data.seq_len, config.data.max_images, vit_trainable)
        peak = flops_lib.peak_flops_per_device() * jax.device_count()
        if tc.caption_every or tc.final_eval:
            tokenizer = Tokenizer(pipeline.expand(config.data.tokenizer, config.data.data_dir), config.model.tokens)
        if tc.caption_every:
            caption_images = np.stack([pixels for pixels, _ in captioning.held_out_images(
                config.data, config.model.vit.image_size, tc.caption_samples)])

        # ------------------------------------------------------------ loop
        progress = tqdm(total=tc.steps, initial=latest, disable=not is_main, desc="train", unit="step")
        window, window_start = [], time.perf_counter()
        for step in range(latest + 1, tc.steps + 1):
            batch = pipeline.to_global(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            if tc.nonfinite == "halt" and not bool(metrics["finite"]):
                raise FloatingPointError(f"non-finite loss or gradients at step {step}; the update was dropped and "
                                         f"nothing from this step is checkpointed")
            window.append(metrics)
            if step % tc.log_every == 0 or step == tc.steps:
                window = jax.device_get(window)
                seconds = (time.perf_counter() - window_start) / len(window)
                summary = {k: float(np.mean([m[k] for m in window])) for k in
                           ("loss", "text_loss", "regression_loss", "grad_norm", "learning_rate")}
                summary.update({"tokens_per_s": sum(m["tokens"] for m in window) / seconds / len(window),
                                "images_per_s": sum(m["images"] for m in window) / seconds / len(window),
                                "step_time_s": seconds, "mfu": step_flops / seconds / peak,
                                "skipped_updates": float(jax.device_get(state.skipped_updates))})
                events = np.sum([m["events"] for m in window], axis=0)
                summary.update({f"data/{name}": float(n) for name, n in zip(pipeline.EVENTS, events)})
                writer.scalars(step, summary)
                progress.set_postfix(loss=f"{summary['loss']:.3f}")
                window, window_start = [], time.perf_counter()
            if tc.eval_every and step % tc.eval_every == 0:
                writer.scalars(step, held_out_loss(eval_step, state.params, config, model, mesh))
            if tc.caption_every and step % tc.caption_every == 0:
                for i, caption in enumerate(captioning.generate_captions(
                        model, state.params, tokenizer, config.model.tokens, caption_images)):
                    writer.text(step, f"held_out_caption_{i}", caption)
            checkpointer.save(step, state, train_iter, {"skipped_updates": int(state.skipped_updates)},
                              force=step == tc.steps or preemption.requested)
            progress.update(1)
            if preemption.requested:
                break
        progress.close()
        checkpointer.wait()
        checkpointer.close()

        # ------------------------------------------------------------ final evaluation
        result = {"step": int(state.step)}
        if tc.final_eval and not preemption.requested:
            accuracy, samples = FINAL_EVALS[tc.final_eval](model, state.params, tokenizer, config.model.tokens,
                                                           config.data, config.model.vit.image_size, tc.final_eval_count)
            for caption, digit in samples[:8]:
                writer.text(int(state.step), "held_out_captions", f"{digit}: {caption}")
            writer.scalars(int(state.step), {"eval/held_out_caption_accuracy": accuracy})
            result["held_out_caption_accuracy"] = accuracy
        writer.close()
        return result

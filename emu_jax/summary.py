"""Parameter counts of a config's model, per tower and in total, without allocating weights.

    python -m emu_jax.summary --config=configs/emu2_37b.py

Prints one line per tower child (e.g. `llm/layers`), one per tower and, last, `total: <integer>`.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from emu_jax.models import families

def abstract_params(model_config):
    """Parameter shapes of the model (jax.eval_shape: no memory is allocated)."""
    family = families.of(model_config)
    model = family.build(model_config)
    inputs = family.example_inputs(model)
    variables = jax.eval_shape(lambda kw: model.init(jax.random.key(0), **kw), inputs)
    return nn.unbox(variables["params"])


def count_params(model_config) -> dict[str, dict[str, int]]:
    """{tower: {child: count}} for the model the config describes."""
    params = abstract_params(model_config)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    return {tower: {child: size(sub) for child, sub in children.items()} for tower, children in params.items()}


def format_counts(counts: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for tower, children in counts.items():
        for child, n in children.items():
            lines.append(f"  {tower}/{child}: {n:,}")
        lines.append(f"{tower}: {sum(children.values()):,}")
    lines.append(f"total: {sum(sum(c.values()) for c in counts.values())}")
    return lines


def main(argv):
    del argv
    print("\n".join(format_counts(count_params(flags.FLAGS.config.model))))


def run():
    config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/tiny.py.")
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()

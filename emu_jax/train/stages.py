"""Staged recipes in one place: `config.stages` maps names to what changes from a step on.

    config.loss.regression_weight = 0.0        # stage one: text alone
    config.stages = {"aligned": config_lib.stage(2300, freeze=r"^vit/", loss={"regression_weight": 1.0})}

From its `from_step` a stage freezes the parameters its `freeze` regex selects (inside the optax
chain: optimizer.py) and replaces loss weights (`config.loss.<name>`); later stages override
earlier ones. A loss evaluated without a step (held-out loss) uses the last stage's weights.
"""
from __future__ import annotations

import jax.numpy as jnp


def ordered(stages) -> list:
    return sorted(stages.values(), key=lambda stage: stage.from_step)


def freezes(stages) -> list[tuple[str, int]]:
    """(regex, from_step) of every stage that freezes parameters."""
    return [(stage.freeze, stage.from_step) for stage in ordered(stages) if stage.get("freeze")]


def loss_weight(loss_config, stages, name: str, step=None):
    """`loss.<name>` at `step` (traced or None), after the stages that started by then."""
    value = loss_config[name]
    for stage in ordered(stages):
        if name in stage.get("loss", {}):
            value = stage.loss[name] if step is None else jnp.where(step >= stage.from_step, stage.loss[name], value)
    return value

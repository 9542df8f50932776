"""Small builders shared by the model tests: tiny models, their params, interleaved rows."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import init_key, load_config

from emu_jax import tokens as tokens_lib
from emu_jax.models.emu import build_model, example_inputs


def tiny(variant="emu2", **llm_overrides):
    config = load_config("tiny", variant)
    with config.unlocked():
        config.model.llm.update(llm_overrides)
    return config, build_model(config.model)


def row(config, model, layout, rng):
    """Token ids for a layout like ["t3", "img", "t2", "img"]: t<k> = k random text ids."""
    special = config.model.tokens
    ids = []
    for part in layout:
        if part == "img":
            ids += tokens_lib.image_block(special, model.visual_tokens_per_image)
        else:
            ids += list(rng.randint(3, 500, size=int(part[1:])))
    return ids


def batch_of(rows, images, pad_to=None, left=False):
    """Right- (or left-) padded tokens/positions/segment_ids for a list of id lists."""
    length = pad_to or max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if left else slice(0, len(r))
        tokens[b, sl], positions[b, sl], segments[b, sl] = r, np.arange(len(r)), 1
    return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments),
                images=jnp.asarray(images))


def random_images(rng, batch, count, size=32):
    """uint8 [batch, count, size, size, 3], as the pipeline hands images to the model."""
    return rng.randint(0, 256, size=(batch, count, size, size, 3)).astype(np.uint8)


_PARAMS = {}


def init_params(model, batch=None, seed=0):
    """Random params of `model`, made once per model (compiling the initialisers costs seconds);
    they do not depend on the batch."""
    key = (repr(model), seed)
    if key not in _PARAMS:
        inputs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(model))
        init = jax.jit(lambda k, b: model.init(k, **b))
        _PARAMS[key] = nn.unbox(init(init_key(seed), inputs)["params"])
    return _PARAMS[key]


def save_params(directory, params, item="params"):
    """A checkpoint directory as the trainer writes it, holding only `item`."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(str(directory), item_names=(item,))
    manager.save(0, args=ocp.args.Composite(**{item: ocp.args.PyTreeSave(params)}))
    manager.wait_until_finished()
    manager.close()


def stack_layer_params(tree: dict, prefix: str) -> dict:
    """Per-layer children `{prefix}_{i}` -> one `{prefix}` child with a leading layer axis (the
    scanned layout); other entries untouched. Works on any nested dict of arrays."""
    names = sorted((k for k in tree if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit()),
                   key=lambda k: int(k[len(prefix) + 1:]))
    if not names:
        return tree
    out = {k: v for k, v in tree.items() if k not in names}
    out[prefix] = jax.tree.map(lambda *a: jnp.stack(a), *[tree[k] for k in names])
    return out



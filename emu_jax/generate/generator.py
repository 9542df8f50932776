"""One model answering with text and images: prompts in, text and PNG-ready pixels out.

    prompts -> segments -> chunks ending at image requests -> for each chunk: feed it (left-padded
    batch, KV cache), and at its [IMG] regress n embeddings through the cache, then close the block
    with [/IMG] -> text at the end (greedy / sampled / beam) -> the visual decoder turns every
    regressed image into pixels (classifier-free guidance against the unconditional embeddings)

Without a decoder an image request yields its regressed embeddings only. Rows of a batch advance together, so they must ask for the same sequence of outputs (e.g. all
captions, or all one image). With `generate.interleave`, a batch of one may also answer with
images the model decides on: text that emits [IMG] gets that image regressed, and goes on.
Parameters are placed over the config's mesh (`--config.mesh.fsdp=8` shards a checkpoint that
does not fit one device); the jitted loops run under that mesh. A checkpoint of a scanned LLaMA
(the large configs') is decoded unscanned: its stacked layers are cut apart as it is restored (a
training run's evaluators cut a copy: `generate.unstack_layers`).
"""
from __future__ import annotations

import copy
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emu_jax.checkpoint import abstract_with_shardings, restore_params
from emu_jax.data.tokenizer import load_tokenizer
from emu_jax.generate import decoding, prompts as prompts_lib
from emu_jax.models import families, layers
from emu_jax.models import lora as lora_lib
from emu_jax.parallel import interrupts, mesh as mesh_lib


@dataclasses.dataclass
class Output:
    pieces: list  # str and uint8 images [S, S, 3] (None without a decoder), in the order produced
    embeddings: list  # the regressed visual embeddings [n, D] of each image

    @property
    def text(self) -> str:
        return "".join(p for p in self.pieces if isinstance(p, str))

    @property
    def images(self) -> list[np.ndarray]:
        return [p for p in self.pieces if isinstance(p, np.ndarray)]


@dataclasses.dataclass
class Timing:
    text_tokens: int = 0
    text_seconds: float = 0.0
    image_embeddings: int = 0
    image_seconds: float = 0.0
    decoder_seconds: float = 0.0


def text_settings(gc, stop_ids) -> decoding.TextSettings:
    return decoding.TextSettings(max_new_tokens=gc.max_new_tokens, min_new_tokens=gc.min_new_tokens,
                                 strategy=gc.strategy, temperature=gc.temperature, top_k=gc.top_k, top_p=gc.top_p,
                                 num_beams=gc.num_beams, length_penalty=gc.length_penalty, stop_ids=tuple(stop_ids))


class Generator:
    def __init__(self, config, params, tokenizer, *, decoder_params=None, mesh=None):
        self.config, self.tokenizer, self.params = config, tokenizer, params
        self.special = dict(config.model.tokens)
        self.model = families.of(config.model).build(without_remat(config.model))
        self.visual_tokens = self.model.visual_tokens_per_image
        self.frame_tokens = self.model.visual_tokens_per_frame
        self.image_size = self.model.image_size
        self.mesh = mesh or mesh_lib.make_mesh(config.mesh, allow_subset=True)
        self.decoder_params, self.decoder = decoder_params, None
        if decoder_params is not None:
            self.decoder = families.get("visual_decoder").build(config.model)
        self.timing = Timing()
        self._uncond = None
        self._noise = []  # initial latents given to `generate`, consumed image by image

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoints(cls, config, checkpoint: str, decoder_checkpoint: str = "", tokenizer=None, adapter: str = ""):
        """Restores the Emu towers from `checkpoint` (trained or converted) and, given one, the UNet
        and VAE from `decoder_checkpoint` (its EMA when it has one), sharded over the config's mesh.
        `adapter`: a LoRA run's checkpoints, whose adapters (`config.model.lora`) join the base
        weights of `checkpoint`."""
        mesh = mesh_lib.make_mesh(config.mesh, allow_subset=True)
        rules = config.mesh.rules
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            family = families.of(config.model)
            model = family.build(config.model)
            abstract, shardings = mesh_lib.abstract_model(model, family.example_inputs(model), mesh, rules)
            wanted = abstract_with_shardings(abstract, shardings)
            if adapter:
                lora_lib.required_spec(config.model.get("lora"), adapter)
                base, adapters = lora_lib.split(wanted)
                params = lora_lib.join(restore_params(checkpoint, base), restore_params(adapter, adapters))
            else:
                params = restore_params(checkpoint, wanted)
            config, params = unscanned_llm(config, params, release=True)
        decoder_params = restore_decoder(config, decoder_checkpoint, mesh) if decoder_checkpoint else None
        return cls(config, params, tokenizer or load_tokenizer(config.data, config.model.tokens), decoder_params=decoder_params, mesh=mesh)

    # ------------------------------------------------------------------ generation

    def generate(self, batch: list[list], rng=None, noise=None) -> list[Output]:
        """Segment lists (see `prompts.parse`) -> one Output each, batched by `generate.batch_size`.
        `noise`: the initial latents [images, h, w, c] of the images in order (e.g. another
        implementation's draws, to reproduce its pixels), instead of drawing them from `rng`."""
        gc = self.config.generate
        rng = jax.random.key(gc.seed) if rng is None else rng
        self._noise = [] if noise is None else list(np.asarray(noise, np.float32))
        outputs = []
        for start in range(0, len(batch), gc.batch_size):
            interrupts.check()  # a Ctrl-C to any process of a multi-process job stops them all here
            rng, key = jax.random.split(rng)
            outputs += self._generate_batch(batch[start:start + gc.batch_size], key)
        return outputs

    def _generate_batch(self, batch: list[list], rng) -> list[Output]:
        gc = self.config.generate
        if self._autoencodes(batch):
            return self._autoencode(batch, rng)
        chunked = [prompts_lib.split_at_requests(segments) for segments in batch]
        shape = [self._request_kinds(c) for c in chunked]
        if any(s != shape[0] for s in shape):
            bad = next(i for i, s in enumerate(shape) if s != shape[0])
            raise prompts_lib.PromptError(f"prompt {bad} asks for {shape[bad]} but prompt 0 for {shape[0]}: rows of "
                                          f"one batch must ask for the same outputs (use a batch size of 1)")
        wants_text = shape[0][-1] == "text"
        interleave = (wants_text and gc.interleave and len(batch) == 1 and self.decoder is not None
                      and gc.strategy != "beam")
        encoded = [[prompts_lib.encode(chunk, self.tokenizer, self.special, self.visual_tokens,
                                       self.frame_tokens, bos=c == 0)
                    for c, chunk in enumerate(chunks)] for chunks in chunked]
        chunk_lengths = [max(len(row[c][0]) for row in encoded) for c in range(len(chunked[0]))]
        extra = self.visual_tokens + 1
        cache_len = (sum(chunk_lengths) + shape[0].count("image") * extra
                     + (gc.max_new_tokens + (gc.max_images * extra if interleave else 0) if wants_text else 0))
        outputs = [Output([], []) for _ in batch]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.config.mesh.rules):
            state = decoding.start(self.model, len(batch), cache_len)
            for c in range(len(chunked[0])):
                chunk = prompts_lib.left_pad([row[c][0] for row in encoded], [row[c][1] for row in encoded],
                                             self.image_size, self.special["pad"])
                state = self._feed(state, chunk["tokens"], chunk["valid"], chunk["images"])
                if shape[0][c] == "image":
                    state = self._image(state, outputs)
            if wants_text:
                self._text(state, outputs, rng, interleave)
            self._decode_images(outputs, rng)
        return outputs

    @staticmethod
    def _request_kinds(chunks) -> tuple[str, ...]:
        return tuple("image" if chunk and isinstance(chunk[-1], prompts_lib.ImageRequest) else "text"
                     for chunk in chunks)

    def _feed(self, state, tokens, valid, images=None):
        images = None if images is None else jnp.asarray(images)
        return decoding.feed(self.model, self.params, state, jnp.asarray(tokens), jnp.asarray(valid), images)

    def _image(self, state, outputs) -> decoding.State:
        """Regresses one image per row at the [IMG] just fed, then closes the block."""
        begin = time.perf_counter()
        embeddings, state = decoding.regress_image(self.model, self.params, state, count=self.visual_tokens)
        embeddings = mesh_lib.to_host(embeddings)
        self.timing.image_seconds += time.perf_counter() - begin
        self.timing.image_embeddings += embeddings.shape[0] * embeddings.shape[1]
        for out, e in zip(outputs, embeddings):
            out.pieces.append(None)  # the image's place; pixels come from the decoder at the end
            out.embeddings.append(e)
        close = np.full((len(outputs), 1), self.special["img_end"], np.int32)
        return self._feed(state, close, np.ones_like(close))

    def _text(self, state, outputs, rng, interleave: bool) -> None:
        gc = self.config.generate
        stops = [self.tokenizer.eos_id] + ([self.special["img"]] if interleave else [])
        settings = text_settings(gc, stops)
        budget, images = gc.max_new_tokens, 0
        while budget > 0:
            begin = time.perf_counter()
            rng, key = jax.random.split(rng)
            settings = dataclasses.replace(settings, max_new_tokens=budget,
                                           min_new_tokens=min(settings.min_new_tokens, budget))
            if settings.strategy == "beam":
                tokens, lengths, _ = decoding.beam_search(self.model, self.params, state, settings)
            else:
                tokens, lengths, state = decoding.decode_text(self.model, self.params, state, key, settings)
            tokens, lengths = mesh_lib.to_host((tokens, lengths))
            self.timing.text_seconds += time.perf_counter() - begin
            self.timing.text_tokens += int(lengths.sum())
            for out, row, n in zip(outputs, tokens, lengths):
                out.pieces.append(self.tokenizer.decode(row[:n]))
            budget -= int(lengths.max())
            asked_image = interleave and lengths[0] > 0 and tokens[0, lengths[0] - 1] == self.special["img"]
            if not asked_image or images == gc.max_images:
                return
            images += 1
            state = self._image(state, outputs)

    def _autoencodes(self, batch: list[list]) -> bool:
        """Emu2-Gen's autoencoding mode (`model.decoder.autoencode`): a prompt that is one image and
        an image request is redrawn from that image's encoder embeddings, not regressed."""
        if self.decoder is None or not self.config.model.decoder.autoencode:
            return False
        alone = [len(s) == 2 and isinstance(s[0], prompts_lib.ImageInput) and isinstance(s[1], prompts_lib.ImageRequest)
                 for s in batch]
        if any(alone) and not all(alone):
            raise prompts_lib.PromptError(f"prompt {alone.index(not alone[0])} and prompt 0 differ in kind (an image "
                                          f"alone is autoencoded): rows of one batch must ask for the same outputs")
        return all(alone)

    def _encode(self, images, method: str = "encode_images") -> np.ndarray:
        """uint8 images [B, S, S, 3] (normalised pixels with method="encode_pixels") -> the visual
        encoder's embeddings [B, n, D]."""
        targets = self.model.apply({"params": self.params}, jnp.asarray(images)[:, None], method=method)[1]
        return mesh_lib.to_host(targets).astype(np.float32)

    def _autoencode(self, batch: list[list], rng) -> list[Output]:
        """Guided against the embeddings of all-zero normalised pixels (the release's negative)."""
        images = np.stack([segments[0].pixels for segments in batch])
        embeddings = self._encode(images)
        null_image = np.broadcast_to(self._encode(np.zeros(images[:1].shape, np.float32), "encode_pixels"),
                                     embeddings.shape)
        images = self.images_from_embeddings(embeddings, rng, negative=null_image)
        return [Output([image], [e]) for image, e in zip(images, embeddings)]

    def unconditional(self) -> np.ndarray:
        """[n, D]: what guidance contrasts with (`generate.uncond`)."""
        if self._uncond is None:
            kind = self.config.generate.uncond
            if kind == "zeros":
                self._uncond = np.zeros((self.visual_tokens, self.model.target_width), np.float32)
            elif kind == "empty_prompt":
                ids = np.asarray([[self.tokenizer.bos_id, self.special["img"]]], np.int32)
                state = decoding.start(self.model, 1, ids.shape[1] + self.visual_tokens)
                state = self._feed(state, ids, np.ones_like(ids))
                self._uncond = mesh_lib.to_host(decoding.regress_image(self.model, self.params, state,
                                                                       count=self.visual_tokens)[0][0])
            else:
                raise ValueError(f"generate.uncond {kind!r}: choose empty_prompt or zeros")
        return self._uncond

    def images_from_embeddings(self, embeddings: np.ndarray, rng, negative=None) -> np.ndarray:
        """Regressed embeddings [B, n, D] -> uint8 images [B, S, S, 3] through the visual decoder,
        guided against `negative` (default: `unconditional()`); initial latents from `generate`'s
        `noise` while it lasts, else drawn from `rng`."""
        from emu_jax.generate.images import initial_noise, sample_pixels
        from emu_jax.models.visual_decoder import to_uint8
        gc, dc = self.config.generate, self.config.model.decoder
        context = jnp.asarray(embeddings, jnp.float32)
        negative = self.unconditional() if negative is None else negative
        uncond = jnp.broadcast_to(jnp.asarray(negative, jnp.float32), context.shape)
        count = len(context)
        given, self._noise = self._noise[:count], self._noise[count:]
        noise = jnp.asarray(np.stack(given)) if len(given) == count else initial_noise(self.decoder, rng, count)
        pixels = sample_pixels(self.decoder, self.decoder_params, context, uncond, noise,
                               sampler=gc.sampler or dc.sampler, steps=gc.sampler_steps or dc.sampler_steps,
                               guidance=gc.guidance or dc.guidance)
        return mesh_lib.to_host(to_uint8(pixels))

    def _decode_images(self, outputs, rng) -> None:
        """Fills each image's place (None) in the pieces; the j-th place holds the j-th embeddings."""
        places = [(o, i, o.embeddings[j]) for o in outputs
                  for j, i in enumerate(i for i, p in enumerate(o.pieces) if p is None)]
        if not places or self.decoder is None:  # without a decoder, images stay embeddings
            return
        begin = time.perf_counter()
        pixels = self.images_from_embeddings(np.stack([e for _, _, e in places]), rng)
        for (out, i, _), image in zip(places, pixels):
            out.pieces[i] = image
        self.timing.decoder_seconds += time.perf_counter() - begin


def restore_decoder(config, checkpoint: str, mesh=None) -> dict:
    """The visual decoder's UNet and VAE from `checkpoint` (its EMA when it has one), over `mesh`
    (default: the config's)."""
    mesh = mesh or mesh_lib.make_mesh(config.mesh, allow_subset=True)
    family = families.get("visual_decoder")
    decoder = family.build(config.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.mesh.rules):
        abstract, shardings = mesh_lib.abstract_model(decoder, family.example_inputs(decoder), mesh, config.mesh.rules)
    wanted = {t: abstract_with_shardings(abstract[t], shardings[t]) for t in ("unet", "vae")}
    try:
        return restore_params(checkpoint, wanted, item="ema")
    except FileNotFoundError:
        return restore_params(checkpoint, wanted)


def unscanned_llm(config, params: dict, *, release: bool) -> tuple:
    """(config, params) with LLaMA's layers unscanned, for decoding (`layers.unstack`: a step of a
    scanned stack copies each layer's weights out of it, per token: 1.8-2.1x slower on an H200,
    README's accelerator table), unless `generate.unstack_layers` is off. release: the stacked arrays
    are deleted as they are cut (restored parameters, held by nobody else, are not held twice);
    without it (a training run's parameters) the cut layers are a copy."""
    if not (config.model.llm.get("scan_layers") and config.generate.get("unstack_layers", True)):
        return config, params
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.llm.scan_layers = False
    llm = layers.unstack(params["llm"], "layers", release=release)
    return config, dict(params, llm=llm)


def without_remat(model_config):
    """The model config for inference: rematerialisation only trades memory for compute in a
    backward pass (and a cached layer under nn.remat sees its cache's layer index traced)."""
    inference = copy.deepcopy(model_config)
    with inference.unlocked():
        for tower in ("vit", "connector", "llm"):
            if "remat" in inference[tower]:
                inference[tower].remat = "none"
    return inference



"""Autoregressive inference with the KV cache, jitted: text (greedy, sampling, beam search) and
visual embeddings (regressed one position at a time, each fed back as the next input).

A `State` is the cache plus the final hidden state at the last position fed; each loop turns it
into what it needs (next-token logits, or the next visual embedding), and only that. `start` makes an empty
one, `feed` appends a left-padded chunk of tokens (with images spliced in at `<image>`), and each
decoder returns the next State, so text and images interleave by feeding one another's output:

    state = feed(model, params, start(model, batch, cache_len), tokens, valid, images)   # the prompt
    embeddings, state = regress_image(model, params, state, count=n)   # prompt ended in [IMG]
    state = feed(model, params, state, [[IMG_END]], ...)                 # close the block
    tokens, lengths, state = decode_text(model, params, state, rng, settings)

Rows of a batch advance in lockstep (one shared cache index); padding (valid = 0) takes cache slots
with segment id 0, which no real token attends to, and does not advance a row's rotary position.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30


class State(NamedTuple):
    cache: dict
    hidden: jax.Array  # [B, 1, D_llm] final-normed hidden state at the last position fed
    position: jax.Array  # [B] rotary position of the next real input


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """How text is decoded (hashable: a static argument of the jitted loops).

    strategy "greedy" | "sample" (temperature, then top_k, then top_p) | "beam" (num_beams; finished
    hypotheses scored as sum of log-probabilities / generated_length ** length_penalty, so a
    negative penalty prefers shorter ones; the reference's captioning and VQA use beam 5,
    max_new_tokens 20, length_penalty -1). A stop token ends a row and is part of its output;
    none may end it before min_new_tokens."""
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ValueError(f"unknown decoding strategy {self.strategy!r} (greedy, sample, beam)")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                             f"{self.max_new_tokens} and {self.min_new_tokens}")
        if self.strategy == "sample" and (self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0):
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise ValueError(f"beam search needs num_beams >= 1, got {self.num_beams}")

    @property
    def fill_id(self) -> int:
        """What a row holds after it has stopped."""
        return self.stop_ids[0] if self.stop_ids else 0


@partial(jax.jit, static_argnames=("model", "batch", "cache_len"))
def start(model, batch: int, cache_len: int) -> State:
    """An empty state with room for `cache_len` positions (one dispatch for all the layers' buffers)."""
    cache, hidden = model.empty_decoding(batch, cache_len)
    return State(cache, hidden, jnp.zeros((batch,), jnp.int32))


def _feed_embeddings(model, params, state: State, embeddings, valid) -> State:
    """Appends input embeddings [B, T, D] (valid [B, T]: 1 real, 0 padding) to the cache."""
    valid = valid.astype(jnp.int32)
    positions = state.position[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    hidden, cache = model.apply({"params": params}, embeddings, positions, valid, state.cache,
                                method="hidden_states")
    return State(cache, hidden[:, -1:], state.position + valid.sum(axis=1))


def _logits(model, params, state: State) -> jax.Array:
    """[B, V] float32: the next token's logits."""
    return model.apply({"params": params}, state.hidden, method="next_token_logits")[:, 0].astype(jnp.float32)


def _regression(model, params, state: State) -> jax.Array:
    """[B, D_target] float32: the next visual embedding."""
    return model.apply({"params": params}, state.hidden, method="regress")[:, 0].astype(jnp.float32)


@partial(jax.jit, static_argnames=("model",))
def feed(model, params, state: State, tokens, valid, images=None) -> State:
    """Appends tokens [B, T] (left-padded: valid [B, T]); `images` [B, N, S, S, 3] fill the chunk's
    `<image>` tokens in order. The last column must be real in every row."""
    embeddings, _ = model.apply({"params": params}, tokens, images, method="embed")
    return _feed_embeddings(model, params, state, embeddings, valid)


def _feed_tokens(model, params, state, tokens):
    embeddings = model.apply({"params": params}, tokens[:, None], method="embed_tokens")
    return _feed_embeddings(model, params, state, embeddings, jnp.ones_like(tokens)[:, None])


def _forbid_stops(logits, step, settings: TextSettings):
    if not settings.stop_ids or not settings.min_new_tokens:
        return logits
    is_stop = jnp.isin(jnp.arange(logits.shape[-1]), jnp.asarray(settings.stop_ids))
    return jnp.where(is_stop & (step < settings.min_new_tokens), NEG_INF, logits)


def _sample(logits, rng, settings: TextSettings):
    logits = logits / settings.temperature
    if settings.top_k:
        kth = jax.lax.top_k(logits, min(settings.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if settings.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < settings.top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return jax.random.categorical(rng, logits, axis=-1)


@partial(jax.jit, static_argnames=("model", "settings"))
def decode_text(model, params, state: State, rng, settings: TextSettings):
    """Greedy or sampled tokens -> (tokens [B, max_new_tokens], lengths [B] incl. the stop token,
    state after the last token fed). Stops early once every row has stopped."""
    if settings.strategy == "beam":
        raise ValueError("beam search keeps several hypotheses per row: use beam_search")
    batch = state.hidden.shape[0]
    stop_ids = jnp.asarray(settings.stop_ids or (-1,))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < settings.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, state, out, lengths, done, rng = carry
        rng, key = jax.random.split(rng)
        logits = _forbid_stops(_logits(model, params, state), i, settings)
        token = (jnp.argmax(logits, axis=-1) if settings.strategy == "greedy"
                 else _sample(logits, key, settings)).astype(jnp.int32)
        token = jnp.where(done, settings.fill_id, token)
        out = out.at[:, i].set(token)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_ids)
        return i + 1, _feed_tokens(model, params, state, token), out, lengths, done, rng

    out = jnp.full((batch, settings.max_new_tokens), settings.fill_id, jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (jnp.int32(0), state, out, zeros, jnp.zeros((batch,), bool), rng)
    _, state, out, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, state


def _rows(state: State, fn) -> State:
    """fn(array, batch axis) on every per-row array of a State."""
    return State(state.cache.map_rows(fn), fn(state.hidden, 0), fn(state.position, 0))


def _normalised(log_prob_sum, length, penalty: float):
    return log_prob_sum / jnp.maximum(length, 1).astype(jnp.float32) ** penalty


@partial(jax.jit, static_argnames=("model", "settings"))
def beam_search(model, params, state: State, settings: TextSettings):
    """Beam search -> (tokens [B, max_new_tokens], lengths [B], normalised scores [B]) of each
    row's best hypothesis.

    Each step scores the alive beams' continuations, keeps the best 2k; those among the best k that
    end in a stop token join the row's k finished hypotheses (length-normalised), the best k
    non-stop ones stay alive. At max_new_tokens the alive beams count as finished.
    A row is done, and takes no more finished hypotheses, once it holds k and its best alive beam,
    normalised at its current length, does not beat the worst of them: transformers' rule
    (`early_stopping=False`, what the release's `generate` calls run). With a positive penalty
    that is a heuristic (a longer hypothesis could still score higher, and is not looked for)."""
    k, steps, penalty = settings.num_beams, settings.max_new_tokens, settings.length_penalty
    batch, vocab = state.hidden.shape[0], model.vocab_size
    stop_ids = jnp.asarray(settings.stop_ids or (-1,))
    state = _rows(state, lambda x, axis: jnp.repeat(x, k, axis=axis))
    alive_seq = jnp.full((batch, k, steps), settings.fill_id, jnp.int32)
    alive_score = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))  # sums of log-probs
    fin_seq, fin_len = alive_seq, jnp.zeros((batch, k), jnp.int32)
    fin_score = jnp.full((batch, k), NEG_INF, jnp.float32)  # normalised
    rows = jnp.arange(batch)[:, None]

    def merge_finished(fin, seq, length, score):
        """The best k of the finished so far and the new candidates."""
        all_seq = jnp.concatenate([fin[0], seq], axis=1)
        all_len = jnp.concatenate([fin[1], length], axis=1)
        all_score = jnp.concatenate([fin[2], score], axis=1)
        best, idx = jax.lax.top_k(all_score, k)
        return all_seq[rows, idx], all_len[rows, idx], best

    def settled(done, alive_score, fin, length):
        """Rows done once full and their best alive beam, at its current `length`, cannot beat
        the worst finished one (transformers' early_stopping=False heuristic)."""
        worst = fin[2].min(axis=1)
        full = worst > NEG_INF / 2
        return done | (full & (_normalised(alive_score.max(axis=1), length, penalty) <= worst))

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, state, alive_seq, alive_score, fin, done = carry
        log_probs = jax.nn.log_softmax(_forbid_stops(_logits(model, params, state), i, settings), axis=-1).reshape(batch, k, vocab)
        candidates = (alive_score[..., None] + log_probs).reshape(batch, k * vocab)
        scores, flat = jax.lax.top_k(candidates, 2 * k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seq = alive_seq[rows, parent].at[:, :, i].set(token)
        is_stop = jnp.isin(token, stop_ids)
        length = jnp.full(token.shape, i + 1, jnp.int32)
        # only stops ranked among the best k finish a hypothesis (as transformers does): with k=1 a
        # runner-up stop token must not end the answer when greedy would go on
        finishes = is_stop & (jnp.arange(2 * k) < k) & ~done[:, None]
        fin = merge_finished(fin, seq, length, jnp.where(finishes, _normalised(scores, length, penalty), NEG_INF))
        alive_score, pick = jax.lax.top_k(jnp.where(is_stop, NEG_INF, scores), k)
        alive_seq, chosen = seq[rows, pick], token[rows, pick]
        parents = (rows * k + parent[rows, pick]).reshape(-1)
        state = _rows(state, lambda x, axis: jnp.take(x, parents, axis=axis))
        state = _feed_tokens(model, params, state, chosen.reshape(-1))
        return i + 1, state, alive_seq, alive_score, fin, settled(done, alive_score, fin, i + 1)

    carry = (jnp.int32(0), state, alive_seq, alive_score, (fin_seq, fin_len, fin_score), jnp.zeros((batch,), bool))
    i, _, alive_seq, alive_score, fin, done = jax.lax.while_loop(cond, body, carry)
    # rows that ran out of steps: their alive beams compete as finished at full length
    ran_out = (i >= steps) & (alive_score > NEG_INF / 2) & ~done[:, None]
    length = jnp.full((batch, k), i, jnp.int32)
    fin_seq, fin_len, fin_score = merge_finished(
        fin, alive_seq, length, jnp.where(ran_out, _normalised(alive_score, length, penalty), NEG_INF))
    return fin_seq[:, 0], fin_len[:, 0], fin_score[:, 0]


@partial(jax.jit, static_argnames=("model", "count"))
def regress_image(model, params, state: State, *, count: int):
    """The `count` visual embeddings of an image whose `[IMG]` was the last input: each regressed
    embedding is fed back (Emu1 as is, Emu2 through project_up) as the next input, through the
    cache. -> (embeddings [B, count, D_target], state after all `count` inputs)."""
    out = jnp.zeros((state.hidden.shape[0], count, model.target_width), jnp.float32)

    def body(k, carry):
        state, out = carry
        regressed = _regression(model, params, state)
        out = out.at[:, k].set(regressed)
        inputs = model.apply({"params": params}, regressed[:, None], method="feed_back")
        return _feed_embeddings(model, params, state, inputs, jnp.ones(inputs.shape[:2], jnp.int32)), out

    state, out = jax.lax.fori_loop(0, count, body, (state, out))
    return out, state


@partial(jax.jit, static_argnames=("model",))
def _embed(model, params, tokens, images):
    return model.apply({"params": params}, tokens, images, method="embed")[0]


@partial(jax.jit, static_argnames=("model",))
def _rerun_step(model, params, embeddings, positions, segment_ids):
    """The whole sequence without a cache -> the next embedding, fed back as the next input."""
    regressed = model.apply({"params": params}, embeddings, positions, segment_ids, method="decode")[1][:, -1]
    return regressed.astype(jnp.float32), model.apply({"params": params}, regressed[:, None], method="feed_back")


def regress_image_uncached(model, params, tokens, positions, segment_ids, images, *, count: int):
    """The reference method: the whole sequence re-run without a cache for every new embedding
    (each length compiled once). Same inputs as the model's __call__; the prompt ends in `[IMG]`."""
    embeddings = _embed(model, params, tokens, images)
    out = []
    for _ in range(count):
        regressed, fed_back = _rerun_step(model, params, embeddings, positions, segment_ids)
        out.append(regressed)
        embeddings = jnp.concatenate([embeddings, fed_back.astype(embeddings.dtype)], axis=1)
        positions = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)
        segment_ids = jnp.concatenate([segment_ids, jnp.ones_like(segment_ids[:, -1:])], axis=1)
    return jnp.stack(out, axis=1)

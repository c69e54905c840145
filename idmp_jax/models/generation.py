"""Batched, KV-cached, jit-compiled text generation for LlamaForCausalLM and LlavaNextForConditionalGeneration.

`Generator(model, config)` compiles two functions once per input shape:
  prefill  the (left-padded) prompt, images included, into a fresh fixed-size cache (prompt + max_new_tokens),
           and the first new token; the decoder part optionally `prefill_rows` rows at a time (memory);
  decode   up to `chunk_size` steps in a device-side while loop that exits early when every row is done.
Between decode calls the host checks stop strings (decoding the new tokens with the caller's `decode_fn`) and
stops when every row is done, so the device never waits on the host inside a chunk.

Semantics follow transformers' `generate`: greedy = argmax (first index on ties); sampling = temperature, then
top-k, then top-p, then a categorical draw; a row is done after emitting an EOS id, a stop token sequence or a
stop string, and is filled with `pad_token_id` afterwards (the EOS / stop token itself is kept). Finished rows
keep feeding `pad_token_id` through the model, as the reference does. Stop sequences and strings are matched in
the new tokens only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.models import llama


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 40
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 = off (transformers' GenerationConfig defaults to 50 when sampling; set it to match).
  top_p: float = 1.0
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int = 0
  stop_token_sequences: tuple[tuple[int, ...], ...] = ()
  chunk_size: int = 32  # Decode steps per device call.
  # Prefill the decoder this many rows at a time (0 = all): bounds activation memory beside a large KV cache
  # (the 7B at batch 32 and 3k-token prompts does not fit otherwise). Must divide the batch.
  prefill_rows: int = 0


def select_tokens(logits, rng, config: GenerationConfig):
  """(B, V) logits -> (B,) int32 next tokens."""
  logits = logits.astype(jnp.float32)
  if not config.do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  neg = jnp.finfo(jnp.float32).min
  if config.top_k:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if config.top_p < 1.0:
    # Keep the smallest set of top tokens whose mass reaches top_p (at least one): a token stays if the mass of
    # the tokens ranked above it is below top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_above < config.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _stops(tokens, step, tok, config: GenerationConfig):
  """(B,) bool: the token just written at column `step` ends the row (EOS or a stop token sequence)."""
  done = jnp.zeros(tok.shape, bool)
  for e in config.eos_token_id:
    done |= tok == e
  for seq in config.stop_token_sequences:
    n = len(seq)
    window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - n + 1, 0), n, axis=1)
    done |= (step + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32)[None], axis=1)
  return done


class Generator:
  """Generation for a model with `embed(input_ids, ...)`, `prefill(inputs_embeds, attention_mask, cache)` and
  `decode_step(input_ids, cache)` (LlamaForCausalLM and LlavaNextForConditionalGeneration). Keep one per model
  and config: it holds the compiled functions. Pass params already in the compute dtype (`cast_params`): the
  weights are then read once per step, not converted per step."""

  def __init__(self, model, config: GenerationConfig, cache_dtype=None):
    self.model, self.config = model, config
    self.text_config = getattr(model.config, "text_config", model.config)
    self.cache_dtype = cache_dtype or model.dtype
    # Prefill is three compiled pieces driven from the host: embeddings of the whole batch (LLaVA: the vision
    # tower), the decoder over `prefill_rows` rows at a time writing into the donated cache in place, and the
    # first token. (One jit with a loop over row chunks kept a second copy of the cache on GPU.)
    self._embed = jax.jit(lambda p, inputs: model.apply({"params": p}, **inputs, method="embed"))
    self._new_cache = jax.jit(lambda b, n: llama.init_cache(self.text_config, b, n, self.cache_dtype),
                              static_argnums=(0, 1))
    self._prefill_rows = jax.jit(self._prefill_rows_impl, donate_argnums=(1,))
    self._start = jax.jit(self._start_impl)
    self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))

  def _prefill_rows_impl(self, params, cache, x, mask, row0):
    logits, cache = self.model.apply({"params": params}, x, mask, dict(cache, row0=row0), method="prefill")
    return logits[:, -1].astype(jnp.float32), cache

  def _start_impl(self, logits, rng):
    cfg = self.config
    b = logits.shape[0]
    rng, sub = jax.random.split(rng)
    tok = select_tokens(logits, sub, cfg)
    tokens = jnp.full((b, cfg.max_new_tokens), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    done = _stops(tokens, 0, tok, cfg)
    # `end`: each row's length once done (max_new_tokens while running).
    end = jnp.where(done, 1, cfg.max_new_tokens).astype(jnp.int32)
    return {"tokens": tokens, "step": jnp.ones((), jnp.int32), "done": done, "end": end, "last": tok, "rng": rng}

  def _decode_impl(self, params, state):
    cfg = self.config

    def cond(carry):
      i, s = carry
      return (i < cfg.chunk_size) & (s["step"] < cfg.max_new_tokens) & ~jnp.all(s["done"])

    def body(carry):
      i, s = carry
      logits, cache = self.model.apply({"params": params}, s["last"][:, None], s["cache"],
                                       method="decode_step")
      rng, sub = jax.random.split(s["rng"])
      tok = select_tokens(logits[:, -1], sub, cfg)
      tok = jnp.where(s["done"], cfg.pad_token_id, tok)
      tokens = jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, s["step"]))
      done = s["done"] | _stops(tokens, s["step"], tok, cfg)
      end = jnp.where(done & ~s["done"], s["step"] + 1, s["end"])
      return i + 1, {"cache": cache, "tokens": tokens, "step": s["step"] + 1, "done": done, "end": end,
                     "last": tok, "rng": rng}

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))[1]

  def prefill(self, params, inputs: Mapping[str, Any], rng=None):
    """Device state after the prompt (for timing prefill and decode apart)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    inputs = dict(inputs)
    mask = inputs.pop("attention_mask")
    b, t = mask.shape
    rows = self.config.prefill_rows or b
    if b % rows:
      raise ValueError(f"prefill_rows {rows} does not divide the batch {b}")
    x = self._embed(params, inputs)
    cache = self._new_cache(b, t + self.config.max_new_tokens)
    logits = []
    for r0 in range(0, b, rows):
      lg, cache = self._prefill_rows(params, cache, x[r0:r0 + rows], mask[r0:r0 + rows], r0)
      logits.append(lg)
    # The cache stays out of `_start`: passed through a jit, XLA copied half of it (24 GiB at batch 32) instead
    # of aliasing the donated buffers. Row chunks leave `index` for the caller to move.
    state = self._start(jnp.concatenate(logits) if len(logits) > 1 else logits[0], rng)
    return dict(state, cache=dict(cache, index=jnp.asarray(t, jnp.int32)))

  def decode(self, params, state):
    """Up to chunk_size more steps (the state is donated)."""
    return self._decode(params, state)

  def __call__(self, params, inputs: Mapping[str, Any], rng=None, *, stop_strings: Sequence[str] = (),
               decode_fn: Optional[Callable[[list[int]], str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """inputs: input_ids (B, T) left-padded, attention_mask (B, T), and for LLaVA pixel_values and
    feature_index. Returns (tokens (B, max_new_tokens) int32 with pad_token_id after each row's end,
    lengths (B,)). `stop_strings` need `decode_fn` (token ids -> text, e.g. a tokenizer's decode)."""
    if stop_strings and decode_fn is None:
      raise ValueError("stop_strings need decode_fn (token ids -> text) to be matched")
    cfg = self.config
    state = self.prefill(params, inputs, rng)
    b = state["tokens"].shape[0]
    ends = np.full(b, -1)  # Host-found stop-string ends (exclusive), -1 = none yet.
    checked = np.zeros(b, int)
    while True:
      step, done, end, tokens = jax.device_get((state["step"], state["done"], state["end"], state["tokens"]))
      if stop_strings:
        for i in np.flatnonzero(ends < 0):
          ends[i], checked[i] = _find_stop(tokens[i], checked[i], int(step), stop_strings, decode_fn)
        done = done | (ends >= 0)
        state = dict(state, done=jnp.asarray(done))
      if step >= cfg.max_new_tokens or done.all():
        break
      state = self.decode(params, state)
    lengths = np.minimum(end, step)
    lengths = np.where(ends >= 0, np.minimum(lengths, ends), lengths)
    tokens = np.array(tokens[:, :step])
    tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = cfg.pad_token_id
    return tokens, lengths


def _find_stop(row, start: int, stop: int, stop_strings, decode_fn) -> tuple[int, int]:
  """The first length e in (start, stop] with a stop string in decode(row[:e]), else -1; and the new start."""
  if not any(s in decode_fn(list(row[:stop])) for s in stop_strings):
    return -1, stop
  for e in range(start + 1, stop + 1):
    if any(s in decode_fn(list(row[:e])) for s in stop_strings):
      return e, e
  return -1, stop


def cast_params(params, dtype):
  """Floating params in the compute dtype (bf16 on accelerators) for inference."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)

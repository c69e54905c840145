"""transformers' LlamaForCausalLM (Llama / Vicuna decoder) in Flax, with a fixed-size KV cache for jit.

Module and parameter names mirror transformers' (`model.embed_tokens`, `model.layers_N.self_attn.q_proj`,
`model.norm`, `lm_head`), so a checkpoint converts by renaming alone (`idmp_jax.convert.torch_format`).

The cache is a plain pytree of fixed shape (`init_cache`), so prefill and every decode step are jit-compiled
once and the cache can be donated:
  k, v     tuples (one per layer) of (B, kv_heads, max_len, head_dim) arrays, in the cache dtype: heads-major,
           so a decode step's q.k and p.v are batched over (B, heads) with no transpose of the cache
  k_scale, v_scale  (int8 cache only) tuples of (B, kv_heads, max_len) fp32: each cached vector's scale
  valid    (B, max_len) bool: slot holds a real (non-padding) token
  index    () int32: the next slot to write; all rows write at the same slot, so left padding keeps the
           prompt ends aligned and each decode step writes one column
  row0     (optional, not kept) the first cache row of the input rows, for a prefill in row chunks
  next_pos (B,) int32: the RoPE position of each row's next real token (left padding shifts rows)
Positions follow transformers' generate: cumsum(attention_mask) - 1 over the prompt, then +1 per new token.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.convert import torch_format
from idmp_jax.models import quantize
from idmp_jax.models.attention import decode_attention_int8, decode_attention_int8_update, dot_product_attention
from idmp_jax.models.layers import Linear

LIST_NAMES = ("layers",)
# Rematerialisation of each decoder layer in training (`remat_policy`): what the backward pass may keep.
REMAT_POLICIES = {
    "none": None,  # No remat: every activation is kept.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole layer.
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # Keep the projections' outputs.
}

# Keys every transformers config may carry (PretrainedConfig attributes of 4.x and 5.x, generation defaults
# stored in old configs): they do not change the model's numerics here.
GENERIC_CONFIG_KEYS = (
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label", "label2id",
    "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "transformers_version", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "use_cache", "initializer_range", "output_router_logits", "quantization_config",
)


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (x,)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of transformers' LlamaConfig that this port implements (defaults = transformers' defaults)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: Optional[int] = 1
  eos_token_id: tuple[int, ...] = (2,)
  pad_token_id: Optional[int] = None

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config.json") -> "LlamaConfig":
    """Parses a LlamaConfig dict: the full form transformers 5 writes or the partial form of older hub configs
    (missing keys take transformers' defaults). RoPE: `rope_theta`/`rope_scaling` (4.x) or `rope_parameters`
    (5.x); only the default rope type is implemented."""
    rope = cfg.get("rope_parameters")
    ok_rope = lambda p: p is None or (isinstance(p, dict) and set(p) <= {"rope_type", "rope_theta", "type"}
                                      and p.get("rope_type", p.get("type", "default")) == "default")
    supported = {
        "model_type": lambda v: v == "llama", "vocab_size": None, "hidden_size": None, "intermediate_size": None,
        "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None,
        "hidden_act": lambda v: v == "silu", "max_position_embeddings": None, "rms_norm_eps": None,
        "pretraining_tp": lambda v: v in (None, 1), "attention_bias": None, "mlp_bias": None,
        "attention_dropout": lambda v: not v, "tie_word_embeddings": None, "rope_theta": None,
        "rope_scaling": lambda v: v is None, "rope_parameters": ok_rope,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    torch_format.check_config_keys(cfg, supported, source=source, ignore=GENERIC_CONFIG_KEYS)
    d = cls()
    get = lambda k: cfg[k] if cfg.get(k) is not None else getattr(d, k)
    heads = get("num_attention_heads")
    theta = (rope or {}).get("rope_theta", cfg.get("rope_theta", d.rope_theta))
    return cls(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or get("hidden_size") // heads,
        max_position_embeddings=get("max_position_embeddings"), rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=float(theta), attention_bias=bool(get("attention_bias")), mlp_bias=bool(get("mlp_bias")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id", d.bos_token_id),
        eos_token_id=_as_tuple(cfg.get("eos_token_id", d.eos_token_id)), pad_token_id=cfg.get("pad_token_id"))

  def to_dict(self) -> dict:
    """transformers 5 LlamaConfig dict."""
    eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
    return {
        "model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim, "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps, "pretraining_tp": 1, "attention_bias": self.attention_bias,
        "attention_dropout": 0.0, "mlp_bias": self.mlp_bias, "tie_word_embeddings": self.tie_word_embeddings,
        "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "initializer_range": 0.02, "use_cache": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# Building blocks.


class RMSNorm(nn.Module):
  """LlamaRMSNorm: statistics in fp32, the normalised value cast to the compute dtype before the weight (as the
  reference casts to the input dtype)."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
  """Default RoPE tables for integer positions (B, T) -> cos, sin (B, T, head_dim) in fp32 (halves repeated,
  as the reference's `cat((freqs, freqs))`)."""
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x (B, T, N, H) rotated by the tables (B, T, H), rotate_half convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _int8_kernels(implementation: str) -> str:
  """The int8 decode attention's choice: "xla" keeps the whole decoder on XLA, anything else lets it pick its own
  ("auto": the Pallas kernel on GPU)."""
  return "xla" if implementation == "xla" else "auto"


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, row0=None):
    """mask: (B, 1, T, S) boolean, or None for plain causal attention (no mask tensor at all)."""
    c = self.config
    b, t, _ = x.shape
    dense = lambda n, name: Linear(n * c.head_dim, use_bias=c.attention_bias, dtype=self.dtype, name=name)
    q = dense(c.num_attention_heads, "q_proj")(x).reshape(b, t, c.num_attention_heads, c.head_dim)
    k = dense(c.num_key_value_heads, "k_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    v = dense(c.num_key_value_heads, "v_proj")(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_cache, out = None, None
    if kv_cache is not None:
      # Write this chunk at slot `index` of cache rows row0..row0+b, then attend over those rows' whole
      # fixed-size cache (b < cache rows: a prefill in row chunks, see `_rows`).
      heads_major = lambda a: jnp.swapaxes(a, 1, 2)
      put = lambda cache, new: jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype),
                                                            (row0, 0, index, 0)[:cache.ndim])
      if len(kv_cache) == 4 and t == 1 and b == kv_cache[0].shape[0]:
        # A decode step over the whole int8 cache: write this step's key and value and attend in one call (one
        # Pallas kernel on GPU unless XLA attention is asked for).
        out, new_cache = decode_attention_int8_update(q, k, v, kv_cache, index, mask=mask,
                                                      implementation=_int8_kernels(self.implementation))
      elif len(kv_cache) == 4:  # int8 cache: (k, v, k_scale, v_scale), one scale per cached vector.
        (qk, sk), (qv, sv) = quantize.quantize_vectors(heads_major(k)), quantize.quantize_vectors(heads_major(v))
        new_cache = (put(kv_cache[0], qk), put(kv_cache[1], qv), put(kv_cache[2], sk), put(kv_cache[3], sv))
        ck, cv, sk, sv = (_rows(a, row0, b) for a in new_cache)
        if t == 1:  # Decode: read the cache as int8 (a Pallas kernel on GPU unless XLA attention is asked for).
          out = decode_attention_int8(q, ck, cv, sk, sv, mask=mask,
                                      implementation=_int8_kernels(self.implementation))
        else:  # Prefill: attend over the dequantised rows.
          ck, cv = quantize.dequantize_vectors(ck, sk, self.dtype), quantize.dequantize_vectors(cv, sv, self.dtype)
      else:
        new_cache = (put(kv_cache[0], heads_major(k)), put(kv_cache[1], heads_major(v)))
        ck, cv = (_rows(a, row0, b) for a in new_cache)
      if out is None:  # (B, S, N, H) views for the attention function; XLA folds the swap into the dots.
        k, v = jnp.swapaxes(ck, 1, 2).astype(self.dtype), jnp.swapaxes(cv, 1, 2).astype(self.dtype)
    if out is None:
      groups = c.num_attention_heads // c.num_key_value_heads
      if groups > 1:  # Grouped-query attention: the shared attention function wants one k/v head per q head.
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
      # One query (a decode step) is a memory-bound matrix-vector product: XLA's einsum path does it well and
      # avoids fused-kernel restrictions on tiny query lengths.
      impl = "xla" if t == 1 else self.implementation
      out = dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation=impl)
    out = out.astype(self.dtype)
    out = Linear(c.hidden_size, use_bias=c.attention_bias, dtype=self.dtype, name="o_proj")(
        out.reshape(b, t, c.num_attention_heads * c.head_dim))
    return out, new_cache


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, name: Linear(n, use_bias=c.mlp_bias, dtype=self.dtype, name=name)
    h = nn.silu(dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size, "up_proj")(x)
    return dense(c.hidden_size, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, row0=None):
    c = self.config
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
    h, new_cache = LlamaAttention(c, self.dtype, self.implementation, name="self_attn")(h, cos, sin, mask,
                                                                                        kv_cache, index, row0)
    x = x + h
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + LlamaMLP(c, self.dtype, name="mlp")(h), new_cache


# ----------------------------------------------------------------------------------------------------------------
# Cache and masks.


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for `batch` rows of at most `max_len` tokens (prompt + new tokens). dtype int8 stores each
  cached vector as int8 with an fp32 scale (`k_scale`, `v_scale`: (B, kv_heads, max_len) per layer; see
  `idmp_jax.models.quantize`): half the bytes a decode step reads from the cache, lossy."""
  shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
  zeros = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
  cache = {"k": zeros(shape, dtype), "v": zeros(shape, dtype), "valid": jnp.zeros((batch, max_len), bool),
           "index": jnp.zeros((), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32)}
  if jnp.dtype(dtype) == jnp.dtype(jnp.int8):
    cache["k_scale"], cache["v_scale"] = zeros(shape[:-1], jnp.float32), zeros(shape[:-1], jnp.float32)
  elif not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"KV cache dtype {jnp.dtype(dtype)}: expected a float dtype or int8")
  return cache


def _rows(a, row0, n: int):
  """Rows row0..row0+n of a cache array (the whole array when n covers it: the usual, copy-free case)."""
  return a if n == a.shape[0] else jax.lax.dynamic_slice_in_dim(a, row0, n, axis=0)


def _put_rows(a, rows, row0):
  return rows if rows.shape[0] == a.shape[0] else jax.lax.dynamic_update_slice_in_dim(a, rows, row0, axis=0)


def _attention_mask(key_valid, query_slot):
  """(B, 1, T, S) boolean: query at slot q sees real keys at slots <= q (causal), and always itself, so a padding
  query never has an empty row (no NaN can reach the cache whatever the attention kernel)."""
  slots = jnp.arange(key_valid.shape[1])
  causal = slots[None, :] <= query_slot[:, None]
  own = slots[None, :] == query_slot[:, None]
  return ((key_valid[:, None, :] & causal[None]) | own[None])[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Models.


class LlamaModel(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  implementation: str = "auto"
  remat_policy: str = "none"

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r}: expected one of {tuple(REMAT_POLICIES)}")
    layer = LlamaDecoderLayer
    if self.remat_policy != "none":  # Same param names: nn.remat keeps the wrapped module's name.
      layer = nn.remat(LlamaDecoderLayer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=True)
    self.layers = [layer(c, self.dtype, self.implementation, name=f"layers_{i}")
                   for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
               right_padded: bool = False):
    """Returns (last hidden states (B, T, hidden), updated cache or None).

    attention_mask (B, T): 1 for real tokens, 0 for padding (default all 1). Without a cache the positions
    default to 0..T-1 (the reference's forward); with a cache they continue each row from `next_pos`.
    right_padded (no cache only): the caller promises every row's padding is at its end (training batches).
    Attention is then plain causal with no mask tensor: padding keys come after every real query, so causality
    already hides them, and only the padding queries' own outputs differ (a loss must mask them, as it does).
    This runs cuDNN's causal kernel instead of one reading a (T, T) mask, which is faster and avoids the
    NaN gradients that cuDNN's backward has given with explicit masks.
    A cache may hold more rows than the input (a prefill in row chunks, to bound activation memory): the
    optional cache entry `row0` says which rows the input's B rows are; `index` is then left unchanged.
    """
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    b, t = x.shape[:2]
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
      index, key_valid = 0, am
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      index, row0 = cache["index"], cache.get("row0", 0)
      key_valid = jax.lax.dynamic_update_slice(_rows(cache["valid"], row0, b), am, (0, index))
      next_pos = _rows(cache["next_pos"], row0, b)
      if positions is None:
        positions = next_pos[:, None] + jnp.cumsum(am, axis=1, dtype=jnp.int32) - 1
        positions = jnp.where(am, positions, 0)
    if right_padded and cache is not None:
      raise ValueError("right_padded applies to a forward without a KV cache")
    mask = None if right_padded else _attention_mask(key_valid, index + jnp.arange(t))
    cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
    names = ("k", "v", "k_scale", "v_scale") if cache is not None and "k_scale" in cache else ("k", "v")
    new_kv = [[] for _ in names]
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else tuple(cache[n][i] for n in names)
      x, kv = layer(x, cos, sin, mask, kv, index, None if cache is None else row0)
      if cache is not None:
        for out, a in zip(new_kv, kv):
          out.append(a)
    x = self.norm(x)
    if cache is None:
      return x, None
    whole = b == cache["valid"].shape[0]
    return x, {**{n: tuple(a) for n, a in zip(names, new_kv)},
               "valid": _put_rows(cache["valid"], key_valid, row0), "index": index + t if whole else index,
               "next_pos": _put_rows(cache["next_pos"], next_pos + jnp.sum(am, axis=1, dtype=jnp.int32), row0)}


class LlamaForCausalLM(nn.Module):
  """Inputs follow the reference: input_ids (B, T) int, attention_mask (B, T) (1 = real token)."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  implementation: str = "auto"
  remat_policy: str = "none"

  def setup(self):
    self.model = LlamaModel(self.config, self.dtype, self.implementation, self.remat_policy)
    if not self.config.tie_word_embeddings:
      self.lm_head = Linear(self.config.vocab_size, use_bias=False, dtype=self.dtype)

  def embed(self, input_ids):
    return self.model.embed_tokens(input_ids)

  def logits(self, hidden):
    if self.config.tie_word_embeddings:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
               last_only: bool = False, right_padded: bool = False):
    """(logits, cache). `last_only`: logits of the last position only, (B, 1, vocab) (prefill: left padding
    puts every row's last real token there; the full (B, T, vocab) would be large). `right_padded`: see
    `LlamaModel`."""
    h, cache = self.model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          positions=positions, cache=cache, right_padded=right_padded)
    if last_only:
      h = h[:, -1:]
    return self.logits(h), cache

  # The generation interface (idmp_jax.models.generation), shared with LlavaNextForConditionalGeneration.
  def prefill(self, inputs_embeds, attention_mask, cache):
    """A cached forward of embeddings (B, T, D) -> (last logits (B, 1, V), cache)."""
    return self(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, last_only=True)

  def decode_step(self, input_ids, cache):
    """A cached step on tokens (B, T) -> (last logits (B, 1, V), cache)."""
    return self(input_ids, cache=cache, last_only=True)


def abstract_params(config: LlamaConfig) -> dict:
  """The param tree's shapes (fp32), without allocating it."""
  model = LlamaForCausalLM(config)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return jax.eval_shape(init)


# ----------------------------------------------------------------------------------------------------------------
# A standalone LlamaForCausalLM folder (config.json + model.safetensors[.index.json]); LLaVA's loader is in
# llava_next.py.


def load_pretrained(folder: str, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  config_path = os.path.join(folder, "config.json")
  config = LlamaConfig.from_dict(torch_format.read_json(config_path), source=config_path)
  files = torch_format.find_weights(folder, ("model",))
  state = torch_format.load_state_dict(files)
  params = torch_format.state_dict_to_params(state, abstract_params(config), LIST_NAMES, dtype=dtype,
                                             source=", ".join(files))
  return config, params


def save_pretrained(folder: str, config: LlamaConfig, params, dtype=None) -> None:
  state = torch_format.params_to_state_dict(jax.device_get(params), LIST_NAMES, dtype=dtype)
  torch_format.save_state_dict(state, os.path.join(folder, "model.safetensors"))
  cfg = dict(config.to_dict(), architectures=["LlamaForCausalLM"])
  torch_format.write_json(cfg, os.path.join(folder, "config.json"))

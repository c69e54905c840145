"""transformers' CLIP text and vision towers (CLIPTextModel, CLIPVisionModel) in Flax Linen.

Interfaces (inputs follow transformers; both towers return the same triple):

  CLIPVisionTransformer(config, dtype=...).apply({"params": p}, pixel_values)
      pixel_values: (B, 3, H, W) float, NCHW like transformers (transposed to NHWC inside), H == W == image_size.
      -> (last_hidden_state (B, 1 + P, D), pooled (B, D) = post_layernorm(last_hidden_state[:, 0]),
          hidden_states: tuple of num_hidden_layers + 1 arrays (B, 1 + P, D); [0] = embeddings after
          pre_layrnorm, [i] = output of encoder layer i, [-1] = last_hidden_state (no post_layernorm),
          exactly transformers' output_hidden_states. LLaVA's vision_feature_layer=-2 is hidden_states[-2]).
  CLIPTextTransformer(config, dtype=...).apply({"params": p}, input_ids)
      input_ids: (B, T) int, T <= max_position_embeddings. Causal self-attention, no padding mask (SD-2 calls
      the text encoder without one).
      -> (last_hidden_state (B, T, D) after final_layer_norm, pooled (B, D) at the EOS position,
          hidden_states: tuple of num_hidden_layers + 1; [0] = embeddings, [-1] = last layer before
          final_layer_norm).

Files: `load_text_encoder(folder)` / `save_text_encoder(folder, config, params)` and `load_vision_model` /
`save_vision_model` read and write stock transformers CLIPTextModel / CLIPVisionModel folders (config.json +
model.safetensors, fp32 or fp16). Hub checkpoints keep the tensors under `text_model.` / `vision_model.` (the
transformers 4.x module path); transformers 5.x `save_pretrained` of a fresh model writes them without prefix.
Both are read; we write the prefixed hub layout, which 4.x and 5.x load. The obsolete `embeddings.position_ids`
buffer of old checkpoints is skipped. For checkpoints that embed a tower (LLaVA-NeXT's `vision_tower.`), use
`CLIPVisionConfig.from_dict` and `vision_params_from_state_dict(..., key_prefix=...)` /
`vision_state_dict(..., key_prefix=...)`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.convert import torch_format as tf
from idmp_jax.models.attention import dot_product_attention
from idmp_jax.models.layers import Conv2d, LayerNorm, Linear, gelu

LIST_NAMES = ("layers",)
TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
_WEIGHT_STEMS = ("model", "model.fp16")
_OBSOLETE_BUFFERS = ("embeddings.position_ids",)  # Persistent in transformers < 4.31, never a parameter.

_ACTIVATIONS = {
    "gelu": gelu,  # SD-2's OpenCLIP ViT-H text tower.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (LLaVA's vision tower).
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Keys transformers writes into config.json that do not change the forward pass (training, generation,
# tokenizer and bookkeeping fields of PretrainedConfig).
_METADATA_KEYS = frozenset("""
architectures torch_dtype dtype transformers_version model_type initializer_range initializer_factor
attention_dropout dropout return_dict output_hidden_states output_attentions torchscript use_bfloat16
tie_word_embeddings is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size
tie_encoder_decoder chunk_size_feed_forward id2label label2id num_labels problem_type finetuning_task
tokenizer_class prefix task_specific_params sep_token_id decoder_start_token_id max_length min_length do_sample
early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
exponential_decay_length_penalty suppress_tokens begin_suppress_tokens tf_legacy_loss bos_token_id pad_token_id
eos_token_id
""".split())


def _pos_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _opt_int(v):
  return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _eps(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


_COMMON_CHECKS = {
    "hidden_size": _pos_int, "intermediate_size": _pos_int, "num_hidden_layers": _pos_int,
    "num_attention_heads": _pos_int, "hidden_act": lambda v: v in _ACTIVATIONS, "layer_norm_eps": _eps,
    "projection_dim": _opt_int, "pruned_heads": lambda v: not v,
}


def _parse(cls, raw: Mapping[str, Any], checks: dict, model_type: str, source: str, ignore=()):
  tf.check_config_keys(raw, checks, source=source, ignore=_METADATA_KEYS.union(ignore) - set(checks))
  if raw.get("model_type", model_type) != model_type:
    raise tf.CheckpointError(f"{source}: config key 'model_type' = {raw['model_type']!r}, expected "
                             f"{model_type!r}")
  fields = {f.name for f in dataclasses.fields(cls)}
  config = cls(**{k: v for k, v in raw.items() if k in fields})
  if config.hidden_size % config.num_attention_heads:
    raise tf.CheckpointError(f"{source}: config key 'num_attention_heads' = {config.num_attention_heads} does "
                             f"not divide hidden_size {config.hidden_size}")
  return config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' CLIPTextConfig fields that matter (defaults are transformers 5.x's)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  bos_token_id: Optional[int] = 49406  # Kept only to write config.json back; the model does not use them.
  pad_token_id: Optional[int] = 1
  projection_dim: Optional[int] = 512

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "text config") -> "CLIPTextConfig":
    checks = dict(_COMMON_CHECKS, vocab_size=_pos_int, max_position_embeddings=_pos_int,
                  eos_token_id=lambda v: isinstance(v, int) and not isinstance(v, bool),  # Not a list.
                  bos_token_id=_opt_int, pad_token_id=_opt_int)
    return _parse(cls, raw, checks, "clip_text_model", source)

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), architectures=["CLIPTextModel"], model_type="clip_text_model")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig fields that matter (defaults are transformers 5.x's)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = 512

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], source: str = "vision config") -> "CLIPVisionConfig":
    # `vocab_size` appears in vision_config dicts nested in LLaVA configs (a PretrainedConfig leftover).
    checks = dict(_COMMON_CHECKS, num_channels=_pos_int, image_size=_pos_int, patch_size=_pos_int)
    config = _parse(cls, raw, checks, "clip_vision_model", source, ignore=("vocab_size",))
    if config.image_size % config.patch_size:
      raise tf.CheckpointError(f"{source}: config key 'patch_size' = {config.patch_size} does not divide "
                               f"image_size {config.image_size}")
    return config

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), architectures=["CLIPVisionModel"], model_type="clip_vision_model")


# ----------------------------------------------------------------------------------------------------------------
# Modules.


class CLIPAttention(nn.Module):
  config: Any
  is_causal: bool = False
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    b, t, d = x.shape
    heads = c.num_attention_heads
    q, k, v = (Linear(d, dtype=self.dtype, name=f"{n}_proj")(x).reshape(b, t, heads, d // heads) for n in "qkv")
    out = dot_product_attention(q, k, v, is_causal=self.is_causal, implementation=self.attention_impl)
    return Linear(d, dtype=self.dtype, name="out_proj")(out.astype(self.dtype).reshape(b, t, d))


class CLIPMLP(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Linear(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = _ACTIVATIONS[self.config.hidden_act](x)
    return Linear(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  config: Any
  is_causal: bool = False
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    eps = self.config.layer_norm_eps
    h = LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(self.config, self.is_causal, self.attention_impl, self.dtype, name="self_attn")(h)
    h = LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """Returns every hidden state: the input, then each layer's output (transformers' output_hidden_states)."""
  config: Any
  is_causal: bool = False
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    states = [x]
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.is_causal, self.attention_impl, self.dtype, name=f"layers_{i}")(x)
      states.append(x)
    return tuple(states)


def _embed(num, features, dtype, name):
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    t = input_ids.shape[-1]
    if t > c.max_position_embeddings:
      raise ValueError(f"CLIP text: sequence length {t} > max_position_embeddings {c.max_position_embeddings}")
    tokens = _embed(c.vocab_size, c.hidden_size, self.dtype, "token_embedding")(input_ids)
    positions = _embed(c.max_position_embeddings, c.hidden_size, self.dtype, "position_embedding")(jnp.arange(t))
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """CLIPTextModel. input_ids (B, T) -> (last_hidden_state, pooled, hidden_states); see the module docstring."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
    states = CLIPEncoder(c, True, self.attention_impl, self.dtype, name="encoder")(x)
    last = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(states[-1])
    ids = input_ids.astype(jnp.int32)
    if c.eos_token_id == 2:
      # transformers keeps the pre-#24773 rule for configs with the old eos id (SD-2's): the EOS token is the
      # highest id in the sequence; argmax returns its first occurrence.
      eos_pos = jnp.argmax(ids, axis=-1)
    else:
      eos_pos = jnp.argmax((ids == c.eos_token_id).astype(jnp.int32), axis=-1)  # First EOS (0 if none).
    pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
    return last, pooled, states


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    b, _, h, w = pixel_values.shape
    if h != c.image_size or w != c.image_size:
      raise ValueError(f"CLIP vision: input image size ({h}*{w}) doesn't match model ({c.image_size}*"
                       f"{c.image_size}); position-embedding interpolation is not ported")
    x = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NCHW (transformers' layout) -> NHWC.
    patches = Conv2d(c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, padding=0, use_bias=False,
                     dtype=self.dtype, name="patch_embedding")(x)
    patches = patches.reshape(b, -1, c.hidden_size)  # Row-major over (h, w), as torch's flatten(2).
    cls = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5), (c.hidden_size,),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
    num_positions = (c.image_size // c.patch_size) ** 2 + 1
    return x + _embed(num_positions, c.hidden_size, self.dtype, "position_embedding")(jnp.arange(num_positions))


class CLIPVisionTransformer(nn.Module):
  """CLIPVisionModel. pixel_values (B, 3, H, W) -> (last_hidden_state, pooled, hidden_states); see the module
  docstring."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    x = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)  # (sic) transformers' name.
    states = CLIPEncoder(c, False, self.attention_impl, self.dtype, name="encoder")(x)
    pooled = LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(states[-1][:, 0])
    return states[-1], pooled, states


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.


def _abstract_params(module, dummy):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), dummy))["params"]


def _abstract_text(config):
  return _abstract_params(CLIPTextTransformer(config), jnp.zeros((1, 1), jnp.int32))


def _abstract_vision(config):
  s = config.image_size
  return _abstract_params(CLIPVisionTransformer(config), jnp.zeros((1, config.num_channels, s, s), jnp.float32))


def _strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str, source: str) -> dict:
  """Reads both layouts: every key under `prefix` (the hub's) or none (transformers 5.x `save_pretrained`)."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
  return {k: v for k, v in state_dict.items() if k not in _OBSOLETE_BUFFERS}


def text_params_from_state_dict(state_dict, config: CLIPTextConfig, *, key_prefix: str = "",
                                source: str = "checkpoint") -> dict:
  """CLIPTextModel state dict (keys `key_prefix` + `embeddings...`) -> Flax params (fp32)."""
  sd = {k[len(key_prefix):]: v for k, v in state_dict.items() if k.startswith(key_prefix)}
  sd = {k: v for k, v in sd.items() if k not in _OBSOLETE_BUFFERS}
  return tf.state_dict_to_params(sd, _abstract_text(config), LIST_NAMES, source=source)


def vision_params_from_state_dict(state_dict, config: CLIPVisionConfig, *, key_prefix: str = "",
                                  source: str = "checkpoint") -> dict:
  """CLIPVisionModel state dict restricted to keys under `key_prefix` (e.g. LLaVA's
  'vision_tower.vision_model.'; tensors outside it are the caller's) -> Flax params (fp32)."""
  sd = {k[len(key_prefix):]: v for k, v in state_dict.items() if k.startswith(key_prefix)}
  sd = {k: v for k, v in sd.items() if k not in _OBSOLETE_BUFFERS}
  return tf.state_dict_to_params(sd, _abstract_vision(config), LIST_NAMES, source=source)


def text_state_dict(params, *, key_prefix: str = TEXT_PREFIX, dtype=None) -> dict:
  return tf.params_to_state_dict(params, LIST_NAMES, dtype=dtype, key_prefix=key_prefix)


def vision_state_dict(params, *, key_prefix: str = VISION_PREFIX, dtype=None) -> dict:
  return tf.params_to_state_dict(params, LIST_NAMES, dtype=dtype, key_prefix=key_prefix)


def _load(folder, config_cls, prefix, from_sd):
  config_path = os.path.join(folder, "config.json")
  config = config_cls.from_dict(tf.read_json(config_path), source=config_path)
  files = tf.find_weights(folder, _WEIGHT_STEMS)
  sd = _strip_prefix(tf.load_state_dict(files), prefix, files[0])
  return config, from_sd(sd, config, source=", ".join(files))


def _save(folder, config, state, dtype):
  os.makedirs(folder, exist_ok=True)
  dtype_name = next(iter(state.values())).dtype.name  # transformers 5.x records the weights' dtype so.
  tf.write_json(dict(config.to_dict(), dtype=dtype_name), os.path.join(folder, "config.json"))
  tf.save_state_dict(state, os.path.join(folder, "model.safetensors"))


def load_text_encoder(folder: str) -> tuple[CLIPTextConfig, dict]:
  """A transformers CLIPTextModel folder (e.g. SD-2's `text_encoder/`) -> (config, fp32 params)."""
  return _load(folder, CLIPTextConfig, TEXT_PREFIX, text_params_from_state_dict)


def save_text_encoder(folder: str, config: CLIPTextConfig, params, dtype=None) -> None:
  """Writes a CLIPTextModel folder (hub layout, `text_model.` keys); `dtype` e.g. np.float16 (default: as is)."""
  _save(folder, config, text_state_dict(params, dtype=dtype), dtype)


def load_vision_model(folder: str) -> tuple[CLIPVisionConfig, dict]:
  """A transformers CLIPVisionModel folder -> (config, fp32 params)."""
  return _load(folder, CLIPVisionConfig, VISION_PREFIX, vision_params_from_state_dict)


def save_vision_model(folder: str, config: CLIPVisionConfig, params, dtype=None) -> None:
  """Writes a CLIPVisionModel folder (hub layout, `vision_model.` keys)."""
  _save(folder, config, vision_state_dict(params, dtype=dtype), dtype)

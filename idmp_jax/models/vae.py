"""diffusers' AutoencoderKL (the SD-2 VAE) in Flax Linen.

Public functions take and return NCHW arrays like diffusers (models run NHWC inside):

  encode(config, params, images)      images (B, C, H, W) in [-1, 1] -> (mean, logvar), each (B, latent, H/f, W/f);
                                      diffusers' `latent_dist.mean` / `.logvar` (logvar clamped to [-30, 20]).
                                      Not scaled: multiply latents by `config.scaling_factor` for the UNet.
  sample_latent(mean, logvar, key)    mean + exp(logvar / 2) * eps (diffusers' `latent_dist.sample()`).
  decode(config, params, latents)     (B, latent, h, w) unscaled latents -> images (B, C, h*f, w*f), ~[-1, 1].
  load_vae(folder) / save_vae(folder, config, params)   a diffusers `vae/` folder (config.json +
                                      diffusion_pytorch_model[.fp16].safetensors); old checkpoints with the
                                      deprecated attention names (query/key/value/proj_attn) are read too.

`dtype` is the compute dtype; GroupNorm statistics and the attention softmax stay in fp32. diffusers'
`force_upcast` (SD-2: true) means the pipeline runs the VAE in fp32; it is recorded, not acted on here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from idmp_jax.convert import torch_format as tf
from idmp_jax.models.attention import dot_product_attention
from idmp_jax.models.layers import Conv2d, GroupNorm, Linear, upsample_nearest_2x

LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")
_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps and conv_norm_out eps.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _pos_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _floats_or_none(v):
  return v is None or isinstance(v, (int, float)) or (isinstance(v, (list, tuple)) and
                                                      all(isinstance(x, (int, float)) for x in v))


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """diffusers' AutoencoderKL config (defaults are diffusers'). Only fields that change the network are used;
  the rest (scaling_factor, sample_size, ...) are kept so that `save_vae` writes them back."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ("DownEncoderBlock2D",)
  up_block_types: tuple = ("UpDecoderBlock2D",)
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[tuple] = None
  latents_std: Optional[tuple] = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, raw, source: str = "vae config") -> "AutoencoderKLConfig":
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise tf.CheckpointError(f"{source}: config key '_class_name' = {raw['_class_name']!r}, expected "
                               "'AutoencoderKL'")
    is_bool = lambda v: isinstance(v, bool)
    checks = {
        "in_channels": _pos_int, "out_channels": _pos_int, "latent_channels": _pos_int,
        "layers_per_block": _pos_int, "norm_num_groups": _pos_int,
        "down_block_types": lambda v: isinstance(v, (list, tuple)) and all(t == "DownEncoderBlock2D" for t in v),
        "up_block_types": lambda v: isinstance(v, (list, tuple)) and all(t == "UpDecoderBlock2D" for t in v),
        "block_out_channels": lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_pos_int, v)),
        "act_fn": lambda v: v in ("silu", "swish"),
        "sample_size": lambda v: isinstance(v, (int, list, tuple)),  # Only diffusers' tiling reads it.
        "scaling_factor": lambda v: isinstance(v, (int, float)), "shift_factor": _floats_or_none,
        "latents_mean": _floats_or_none, "latents_std": _floats_or_none, "force_upcast": is_bool,
        "use_quant_conv": is_bool, "use_post_quant_conv": is_bool, "mid_block_add_attention": is_bool,
    }
    tf.check_config_keys(raw, checks, source=source)
    tup = lambda v: tuple(v) if isinstance(v, list) else v
    config = cls(**{k: tup(v) for k, v in raw.items() if not k.startswith("_")})
    n = len(config.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if len(getattr(config, key)) != n:
        raise tf.CheckpointError(f"{source}: config key {key!r} has {len(getattr(config, key))} entries, "
                                 f"block_out_channels has {n}")
    for c in config.block_out_channels:
      if c % config.norm_num_groups:
        raise tf.CheckpointError(f"{source}: config key 'norm_num_groups' = {config.norm_num_groups} does not "
                                 f"divide block_out_channels entry {c}")
    return config

  def to_dict(self) -> dict:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    return dict(d, _class_name="AutoencoderKL")

  @property
  def downscale(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Modules (NHWC).


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D without time embedding (temb_channels=None), output_scale_factor 1."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GroupNorm(self.groups, _EPS, dtype=self.dtype, name="norm1", activation="silu")(x)
    h = Conv2d(self.out_channels, dtype=self.dtype, name="conv1")(h)
    h = GroupNorm(self.groups, _EPS, dtype=self.dtype, name="norm2", activation="silu")(h)
    h = Conv2d(self.out_channels, dtype=self.dtype, name="conv2")(h)  # Dropout 0 (inference).
    if x.shape[-1] != self.out_channels:
      x = Conv2d(self.out_channels, kernel_size=1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class VAEAttention(nn.Module):
  """diffusers' Attention as built by UNetMidBlock2D: group_norm, one head of size C, biased projections,
  residual connection, rescale_output_factor 1. Softmax in fp32 (its upcast_softmax)."""
  groups: int
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, _EPS, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
    q, k, v = (Linear(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v, implementation=self.attention_impl).astype(self.dtype)
    y = Linear(c, dtype=self.dtype, name="to_out_0")(y.reshape(b, h, w, c))
    return x + y


class MidBlock(nn.Module):
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c, g = x.shape[-1], self.config.norm_num_groups
    x = ResnetBlock2D(c, g, self.dtype, name="resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = VAEAttention(g, self.attention_impl, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(c, g, self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Downsample2D(nn.Module):
  """diffusers' Downsample2D with padding=0: pad (0, 1) at the bottom and right, then a stride-2 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv2d(self.channels, stride=2, padding=0, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """diffusers' Upsample2D: nearest 2x, then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv2d(self.channels, dtype=self.dtype, name="conv")(upsample_nearest_2x(x))


class Encoder(nn.Module):
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = self.config
    chans, g = c.block_out_channels, c.norm_num_groups
    x = Conv2d(chans[0], dtype=self.dtype, name="conv_in")(x)
    for i, ch in enumerate(chans):
      x = DownEncoderBlock2D(ch, c.layers_per_block, g, i < len(chans) - 1, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(c, self.dtype, self.attention_impl, name="mid_block")(x)
    x = GroupNorm(g, _EPS, dtype=self.dtype, name="conv_norm_out", activation="silu")(x)
    return Conv2d(2 * c.latent_channels, dtype=self.dtype, name="conv_out")(x)  # double_z.


class Decoder(nn.Module):
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, z):
    c = self.config
    chans, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
    x = Conv2d(chans[0], dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(c, self.dtype, self.attention_impl, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpDecoderBlock2D(ch, c.layers_per_block + 1, g, i < len(chans) - 1, self.dtype, name=f"up_blocks_{i}")(x)
    x = GroupNorm(g, _EPS, dtype=self.dtype, name="conv_norm_out", activation="silu")(x)
    return Conv2d(c.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """Methods work on NHWC: `encode(x) -> moments (B, h, w, 2 * latent)`, `decode(z) -> (B, H, W, C)`.
  `__call__` (used for init) runs both."""
  config: AutoencoderKLConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, self.dtype, self.attention_impl)
    self.decoder = Decoder(c, self.dtype, self.attention_impl)
    if c.use_quant_conv:
      self.quant_conv = Conv2d(2 * c.latent_channels, kernel_size=1, padding=0, dtype=self.dtype)
    if c.use_post_quant_conv:
      self.post_quant_conv = Conv2d(c.latent_channels, kernel_size=1, padding=0, dtype=self.dtype)

  def encode(self, x):
    h = self.encoder(x)
    return self.quant_conv(h) if self.config.use_quant_conv else h

  def decode(self, z):
    z = self.post_quant_conv(z) if self.config.use_post_quant_conv else z
    return self.decoder(z)

  def __call__(self, x):
    moments = self.encode(x)
    return self.decode(moments[..., :self.config.latent_channels])


# ----------------------------------------------------------------------------------------------------------------
# Public functions (NCHW, like diffusers).


def _nhwc(x):
  return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x):
  return jnp.transpose(x, (0, 3, 1, 2))


def encode(config: AutoencoderKLConfig, params, images, *, dtype=jnp.float32, attention_impl: str = "auto"):
  """images (B, C, H, W) in [-1, 1], NCHW -> (mean, logvar) NCHW in fp32. H, W multiples of config.downscale."""
  moments = AutoencoderKL(config, dtype, attention_impl).apply({"params": params}, _nhwc(images),
                                                               method=AutoencoderKL.encode)
  moments = _nchw(moments.astype(jnp.float32))
  mean, logvar = jnp.split(moments, 2, axis=1)
  return mean, jnp.clip(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution's clamp.


def sample_latent(mean, logvar, key):
  """A posterior sample: mean + exp(logvar / 2) * eps, eps ~ N(0, 1) from `key` (any layout)."""
  # Drawn flat then reshaped: the same numbers as normal(key, mean.shape) (partitionable threefry), but XLA:CPU
  # takes 10-30 s to compile the multi-dimensional form.
  eps = jax.random.normal(key, (mean.size,), mean.dtype).reshape(mean.shape)
  return mean + jnp.exp(0.5 * logvar) * eps


def decode(config: AutoencoderKLConfig, params, latents, *, dtype=jnp.float32, attention_impl: str = "auto"):
  """latents (B, latent_channels, h, w) NCHW, unscaled (divide UNet latents by scaling_factor first) ->
  images (B, out_channels, h * downscale, w * downscale) NCHW, fp32."""
  out = AutoencoderKL(config, dtype, attention_impl).apply({"params": params}, _nhwc(latents),
                                                           method=AutoencoderKL.decode)
  return _nchw(out.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.


def _abstract_params(config: AutoencoderKLConfig):
  s = 2 * config.downscale
  dummy = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.PRNGKey(0), dummy))["params"]


def _rename_deprecated(state_dict):
  """diffusers' _fix_state_dict_keys_on_load: pre-0.14 checkpoints name the mid-block attention's projections
  query/key/value/proj_attn."""
  out = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    if (len(parts) >= 5 and parts[1:4] == ["mid_block", "attentions", "0"]
        and parts[4] in _DEPRECATED_ATTENTION):
      key = ".".join(parts[:4] + [_DEPRECATED_ATTENTION[parts[4]]] + parts[5:])
    out[key] = value
  return out


def params_from_state_dict(state_dict, config: AutoencoderKLConfig, *, source: str = "checkpoint") -> dict:
  return tf.state_dict_to_params(_rename_deprecated(state_dict), _abstract_params(config), LIST_NAMES,
                                 source=source)


def state_dict_from_params(params, *, dtype=None) -> dict:
  return tf.params_to_state_dict(params, LIST_NAMES, dtype=dtype)


def load_vae(folder: str) -> tuple[AutoencoderKLConfig, dict]:
  """A diffusers AutoencoderKL folder (e.g. SD-2's `vae/`) -> (config, fp32 params)."""
  config_path = os.path.join(folder, "config.json")
  config = AutoencoderKLConfig.from_dict(tf.read_json(config_path), source=config_path)
  files = tf.find_weights(folder, _WEIGHT_STEMS)
  return config, params_from_state_dict(tf.load_state_dict(files), config, source=", ".join(files))


def save_vae(folder: str, config: AutoencoderKLConfig, params, dtype=None) -> None:
  """Writes a diffusers AutoencoderKL folder; `dtype` e.g. np.float16 (default: the params' dtype)."""
  os.makedirs(folder, exist_ok=True)
  tf.write_json(config.to_dict(), os.path.join(folder, "config.json"))
  tf.save_state_dict(state_dict_from_params(params, dtype=dtype),
                     os.path.join(folder, "diffusion_pytorch_model.safetensors"))


load_pretrained, save_pretrained = load_vae, save_vae  # The names docs/CONVENTIONS.md gives every model file.

"""diffusers' UNet2DConditionModel (as configured for stable-diffusion-2-inpainting) in Flax, with regional
cross-attention (RCA, SPEC §3) switchable per call.

Inputs are channels-last: sample (B, H, W, in_channels), e.g. 9 = noisy latents 4 + mask 1 + masked-image
latents 4 for inpainting. With RCA, `region_masks` (B, R, H0, W0) at the image layout resolution and
`token_region` (B, S) give each text token's region; every cross-attention then uses the boolean mask from
`attention.rca_mask`. Without them the model is the stock UNet.

Module and parameter names mirror diffusers' so that `load_pretrained`/`save_pretrained` read and write a stock
`unet/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors) by renaming alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.convert import torch_format
from idmp_jax.models.attention import Attention, rca_mask
from idmp_jax.models.layers import (Conv2d, GroupNorm, LayerNorm, Linear, geglu, resize_nearest_torch,
                                   upsample_nearest_2x)

LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
              "upsamplers", "to_out", "net")
WEIGHTS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, n: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"config key {key!r} has {len(value)} entries, the model has {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 9
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  # diffusers' legacy naming: for this model `attention_head_dim` holds the number of heads per block.
  attention_head_dim: tuple[int, ...] = (5, 10, 20, 20)
  cross_attention_dim: int = 1024
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  use_linear_projection: bool = True
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  sample_size: int = 64

  @property
  def heads(self) -> tuple[int, ...]:
    return self.attention_head_dim

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config.json") -> "UNetConfig":
    is_ = lambda v: (lambda x: x == v)
    none_or = lambda v: (lambda x: x is None or x == v)
    supported = {
        "sample_size": None, "in_channels": None, "out_channels": None, "center_input_sample": is_(False),
        "flip_sin_to_cos": None, "freq_shift": None,
        "down_block_types": lambda x: all(t in DOWN_TYPES for t in x),
        "up_block_types": lambda x: all(t in UP_TYPES for t in x),
        "mid_block_type": is_("UNetMidBlock2DCrossAttn"), "only_cross_attention": is_(False),
        "block_out_channels": None, "layers_per_block": lambda x: isinstance(x, int),
        "downsample_padding": None, "mid_block_scale_factor": None, "dropout": None, "act_fn": is_("silu"),
        "norm_num_groups": lambda x: x is not None, "norm_eps": None, "cross_attention_dim": lambda x: isinstance(x, int),
        "transformer_layers_per_block": None, "reverse_transformer_layers_per_block": none_or(None),
        "encoder_hid_dim": none_or(None), "encoder_hid_dim_type": none_or(None), "attention_head_dim": None,
        "num_attention_heads": none_or(None), "dual_cross_attention": is_(False), "use_linear_projection": None,
        "class_embed_type": none_or(None), "addition_embed_type": none_or(None),
        "addition_time_embed_dim": none_or(None), "num_class_embeds": none_or(None), "upcast_attention": None,
        "resnet_time_scale_shift": is_("default"), "resnet_skip_time_act": is_(False),
        "resnet_out_scale_factor": lambda x: x == 1.0, "time_embedding_type": is_("positional"),
        "time_embedding_dim": none_or(None), "time_embedding_act_fn": none_or(None),
        "timestep_post_act": none_or(None), "time_cond_proj_dim": none_or(None), "conv_in_kernel": is_(3),
        "conv_out_kernel": is_(3), "projection_class_embeddings_input_dim": none_or(None),
        "attention_type": is_("default"), "class_embeddings_concat": is_(False),
        "mid_block_only_cross_attention": lambda x: not x, "cross_attention_norm": none_or(None),
        "addition_embed_type_num_heads": None,
    }
    torch_format.check_config_keys(cfg, supported, source=source)
    get = lambda k: cfg.get(k, getattr(cls, k) if hasattr(cls, k) else None)
    n = len(get("block_out_channels"))
    down, up = tuple(get("down_block_types")), tuple(get("up_block_types"))
    if len(down) != n or len(up) != n:
      raise torch_format.CheckpointError(f"{source}: down_block_types/up_block_types must have {n} entries "
                                         f"(one per block_out_channels)")
    if tuple(reversed([t.startswith("CrossAttn") for t in up])) != tuple(t.startswith("CrossAttn") for t in down):
      raise torch_format.CheckpointError(f"{source}: up_block_types must mirror down_block_types")
    try:
      heads = _per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
      tlayers = _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    except ValueError as e:
      raise torch_format.CheckpointError(f"{source}: {e}") from e
    return cls(
        in_channels=get("in_channels"), out_channels=get("out_channels"),
        block_out_channels=tuple(get("block_out_channels")), down_block_types=down, up_block_types=up,
        layers_per_block=get("layers_per_block"), attention_head_dim=heads,
        cross_attention_dim=get("cross_attention_dim"), transformer_layers_per_block=tlayers,
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)), norm_num_groups=get("norm_num_groups"),
        norm_eps=get("norm_eps"), flip_sin_to_cos=get("flip_sin_to_cos"), freq_shift=get("freq_shift"),
        downsample_padding=get("downsample_padding"), mid_block_scale_factor=get("mid_block_scale_factor"),
        sample_size=get("sample_size") or 64)

  def to_dict(self) -> dict:
    """The diffusers config.json for this model."""
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
        "attention_head_dim": list(self.attention_head_dim), "block_out_channels": list(self.block_out_channels),
        "center_input_sample": False, "cross_attention_dim": self.cross_attention_dim,
        "down_block_types": list(self.down_block_types), "downsample_padding": self.downsample_padding,
        "dual_cross_attention": False, "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
        "in_channels": self.in_channels, "layers_per_block": self.layers_per_block,
        "mid_block_scale_factor": self.mid_block_scale_factor, "norm_eps": self.norm_eps,
        "norm_num_groups": self.norm_num_groups, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": self.out_channels, "sample_size": self.sample_size,
        "transformer_layers_per_block": list(self.transformer_layers_per_block),
        "up_block_types": list(self.up_block_types), "upcast_attention": self.upcast_attention,
        "use_linear_projection": self.use_linear_projection,
    }


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """diffusers' get_timestep_embedding (sinusoidal, fp32)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    h = GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1", activation="silu")(x)
    h = Conv2d(self.out_channels, dtype=self.dtype, name="conv1")(h)
    t = Linear(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2", activation="silu")(h)
    h = Conv2d(self.out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv2d(self.out_channels, kernel_size=1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
    out = x.astype(self.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class FeedForward(nn.Module):
  """GEGLU feed-forward: net.0 = GEGLU(proj: dim -> 2 * 4dim), net.2 = Linear(4dim -> dim)."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _GEGLU(4 * self.dim, dtype=self.dtype, name="net_0")(x)
    return Linear(self.dim, dtype=self.dtype, name="net_2")(h)


class _GEGLU(nn.Module):
  inner: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return geglu(Linear(2 * self.inner, dtype=self.dtype, name="proj")(x))


class BasicTransformerBlock(nn.Module):
  dim: int
  heads: int
  upcast: bool
  attention_impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, cross_mask=None):
    dim_head = self.dim // self.heads
    attn = lambda name: Attention(self.heads, dim_head, upcast=self.upcast, implementation=self.attention_impl,
                                  dtype=self.dtype, name=name)
    norm = lambda name: LayerNorm(dtype=self.dtype, name=name)
    # x = x + attn1(norm1(x)); x = x + attn2(norm2(x)); x = x + ff(norm3(x)), each residual add done by the norm
    # that reads its sum (`layers.residual_layer_norm`: one pass forward and backward on the GPU).
    x, y = norm("norm1")(x, residual=True)
    x, y = norm("norm2")(x, attn("attn1")(y), residual=True)
    x, y = norm("norm3")(x, attn("attn2")(y, context, mask=cross_mask), residual=True)
    return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(y)


class Transformer2DModel(nn.Module):
  heads: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool
  attention_impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, rca=None):
    b, h, w, c = x.shape
    residual = x
    x = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      x = Linear(c, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
    else:
      x = Conv2d(c, kernel_size=1, padding=0, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, c)
    cross_mask = None if rca is None else rca[(h, w)]
    for i in range(self.num_layers):
      x = BasicTransformerBlock(c, self.heads, self.upcast, self.attention_impl, dtype=self.dtype,
                                name=f"transformer_blocks_{i}")(x, context, cross_mask)
    if self.use_linear_projection:
      x = Linear(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
    else:
      x = Conv2d(c, kernel_size=1, padding=0, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, c))
    return x + residual.astype(self.dtype)


class _Sampler(nn.Module):
  """Downsample2D (conv stride 2) or Upsample2D (nearest to `size`, then conv); diffusers names the conv `conv`.

  Upsampling goes to the size of the skip it meets: 2x, or the odd size diffusers passes as `upsample_size`
  (torch's nearest rule either way, so both cases are one code path).
  """
  channels: int
  up: bool
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    if self.up:
      x = upsample_nearest_2x(x) if size == (2 * x.shape[1], 2 * x.shape[2]) else \
          resize_nearest_torch(x, size, axes=(1, 2))
      return Conv2d(self.channels, dtype=self.dtype, name="conv")(x)
    return Conv2d(self.channels, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


class _Block(nn.Module):
  """One down, mid or up block: resnets, optional transformers, optional sampler (diffusers' names).

  kind: "down" (resnet, [attn], ..., downsampler), "mid" (resnet, attn, resnet), "up" (concat skip, resnet,
  [attn], ..., upsampler).
  """
  kind: str
  out_channels: int
  num_layers: int
  heads: Optional[int]  # None: no cross-attention in this block.
  transformer_layers: int
  add_sampler: bool
  config: UNetConfig
  attention_impl: str
  remat: bool
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, rca, skips=None, upsample_size=None):
    cfg = self.config
    Resnet = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    Transformer = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
    resnet = lambda j: Resnet(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, self.output_scale_factor,
                              dtype=self.dtype, name=f"resnets_{j}")
    attention = lambda j: Transformer(self.heads, self.transformer_layers, cfg.norm_num_groups,
                                      cfg.use_linear_projection, cfg.upcast_attention, self.attention_impl,
                                      dtype=self.dtype, name=f"attentions_{j}")
    outputs = []
    if self.kind == "mid":
      x = resnet(0)(x, temb)
      x = attention(0)(x, context, rca)
      return resnet(1)(x, temb), outputs
    for j in range(self.num_layers):
      if self.kind == "up":
        x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
      x = resnet(j)(x, temb)
      if self.heads is not None:
        x = attention(j)(x, context, rca)
      outputs.append(x)
    if self.add_sampler:
      x = _Sampler(self.out_channels, up=self.kind == "up", padding=cfg.downsample_padding, dtype=self.dtype,
                   name=f"{self.kind}samplers_0")(x, upsample_size)
      outputs.append(x)
    return x, outputs


class TimestepEmbedding(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    t = Linear(self.dim, dtype=self.dtype, name="linear_1")(t)
    return Linear(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(t))


class UNet2DConditionModel(nn.Module):
  """The UNet. `attention_impl`: 'auto' | 'xla' | 'cudnn'. `remat`: recompute resnets and transformers in the
  backward pass (activation memory for training)."""
  config: UNetConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, region_masks=None, token_region=None):
    """sample (B, H, W, in_channels); timesteps scalar or (B,); encoder_hidden_states (B, S, cross_dim);
    region_masks (B, R, H0, W0) and token_region (B, S) for RCA. Returns (B, H, W, out_channels) fp32."""
    cfg = self.config
    if (region_masks is None) != (token_region is None):
      raise ValueError("RCA needs both region_masks and token_region (or neither)")
    if sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"sample has {sample.shape[-1]} channels (last axis), the UNet takes {cfg.in_channels}")
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    context = encoder_hidden_states.astype(self.dtype)
    n = len(cfg.block_out_channels)

    # RCA masks, once per feature-map resolution, each straight from the layout resolution (SPEC §3).
    rca = None
    if region_masks is not None:
      rca, (h, w) = {}, sample.shape[1:3]
      for _ in range(n):
        rca[(h, w)] = rca_mask(region_masks, token_region, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2  # Conv k3 s2 p1.

    temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding")(temb)
    x = Conv2d(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(sample)

    block = lambda **kw: _Block(config=cfg, attention_impl=self.attention_impl, remat=self.remat,
                                dtype=self.dtype, **kw)
    skips = [x]
    for i, block_type in enumerate(cfg.down_block_types):
      cross = block_type.startswith("CrossAttn")
      x, outs = block(kind="down", out_channels=cfg.block_out_channels[i], num_layers=cfg.layers_per_block,
                      heads=cfg.heads[i] if cross else None, transformer_layers=cfg.transformer_layers_per_block[i],
                      add_sampler=i < n - 1, name=f"down_blocks_{i}")(x, temb, context, rca)
      skips += outs

    x, _ = block(kind="mid", out_channels=cfg.block_out_channels[-1], num_layers=1, heads=cfg.heads[-1],
                 transformer_layers=cfg.transformer_layers_per_block[-1], add_sampler=False,
                 output_scale_factor=cfg.mid_block_scale_factor, name="mid_block")(x, temb, context, rca)

    for i, block_type in enumerate(cfg.up_block_types):
      k = n - 1 - i  # The down block this one mirrors.
      cross = block_type.startswith("CrossAttn")
      layers = cfg.layers_per_block + 1
      block_skips, skips = skips[-layers:], skips[:-layers]
      up_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
      x, _ = block(kind="up", out_channels=cfg.block_out_channels[k], num_layers=layers,
                   heads=cfg.heads[k] if cross else None, transformer_layers=cfg.transformer_layers_per_block[k],
                   add_sampler=i < n - 1, name=f"up_blocks_{i}")(x, temb, context, rca, block_skips, up_size)

    x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out",
                  activation="silu")(x)
    return Conv2d(cfg.out_channels, dtype=self.dtype, name="conv_out")(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Loading and export.


def init_params(config: UNetConfig, rng, batch: int = 1, size: Optional[int] = None, seq: int = 77):
  """Random fp32 params (our initialisers), for demos and benchmarks."""
  model = UNet2DConditionModel(config)
  return model.init(rng, *example_inputs(config, batch, size, seq))["params"]


def example_inputs(config: UNetConfig, batch: int = 1, size: Optional[int] = None, seq: int = 77):
  s = size or config.sample_size
  return (jnp.zeros((batch, s, s, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, seq, config.cross_attention_dim), jnp.float32))


def abstract_params(config: UNetConfig):
  """Param shapes without allocating (jax.eval_shape of init)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0), size=8, seq=4))


def load_pretrained(folder: str, dtype=np.float32) -> tuple[UNetConfig, dict]:
  """Reads a stock diffusers `unet/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""
  config_path = os.path.join(folder, "config.json")
  raw = torch_format.read_json(config_path)
  if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
    raise torch_format.CheckpointError(f"{config_path}: _class_name {raw['_class_name']!r} is not "
                                       f"UNet2DConditionModel")
  config = UNetConfig.from_dict(raw, source=config_path)
  files = torch_format.find_weights(folder, WEIGHTS_STEMS)
  state = torch_format.load_state_dict(files)
  params = torch_format.state_dict_to_params(state, abstract_params(config), LIST_NAMES, dtype=dtype,
                                             source=", ".join(files))
  return config, params


def save_pretrained(folder: str, config: UNetConfig, params, dtype=None) -> None:
  """Writes a diffusers `unet/` folder that `UNet2DConditionModel.from_pretrained` reads. `dtype=np.float16`
  writes half weights (under the stock name diffusers looks for first)."""
  state = torch_format.params_to_state_dict(jax.device_get(params), LIST_NAMES, dtype=dtype)
  torch_format.save_state_dict(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  torch_format.write_json(config.to_dict(), os.path.join(folder, "config.json"))

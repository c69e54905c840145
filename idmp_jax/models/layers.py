"""Building blocks shared by every ported model.

Parameters are always created and stored in fp32 (`param_dtype`); `dtype` is the compute dtype. Leaf names
(`kernel`, `bias`, `scale`, `embedding`) follow `idmp_jax.convert.torch_format`, so a module named like its
PyTorch counterpart converts by rename alone.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


class Linear(nn.Module):
  """torch.nn.Linear. A LoRA adapter is used when the param tree holds `lora_a`/`lora_b` leaves beside the kernel
  (see `idmp_jax.models.lora`), and an int8 kernel is dequantised when a `kernel_scale` leaf is beside it (see
  `idmp_jax.models.quantize`): the base module stays ignorant of which layers are adapted or quantised."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", default_kernel_init, (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.has_variable("params", "kernel_scale"):  # int8 weights (idmp_jax.models.quantize): per-column scale.
      y = y * self.get_variable("params", "kernel_scale").astype(self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable("params", "lora_a"):
      from idmp_jax.models import lora  # Local import: lora imports this module.
      y = y + lora.apply_adapter(self, x).astype(y.dtype)
    return y


class Conv2d(nn.Module):
  """torch.nn.Conv2d on NHWC inputs (symmetric integer padding as in PyTorch)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", default_kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride, self.stride),
        padding=[(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
    return y


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-last inputs; statistics in fp32 whatever the compute dtype."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    shape = x.shape
    xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = xg.reshape(shape) * scale + bias
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; statistics in fp32."""
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return y.astype(self.dtype)


def upsample_nearest_2x(x):
  """F.interpolate(scale_factor=2, mode='nearest') on NHWC."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def torch_nearest_indices(in_size: int, out_size: int):
  """Source indices of PyTorch's `nearest` interpolation (floorf(dst * (in/out)) in float32, clamped)."""
  import numpy as np
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def resize_nearest_torch(x, size: Sequence[int], axes: Sequence[int] = (-2, -1)):
  """Resizes `x` along `axes` to `size` exactly as torch.nn.functional.interpolate(mode='nearest')."""
  for axis, out in zip(axes, size):
    idx = torch_nearest_indices(x.shape[axis], out)
    x = jnp.take(x, jnp.asarray(idx), axis=axis)
  return x

"""Building blocks shared by every ported model.

Parameters are always created and stored in fp32 (`param_dtype`); `dtype` is the compute dtype. Leaf names
(`kernel`, `bias`, `scale`, `embedding`) follow `idmp_jax.convert.torch_format`, so a module named like its
PyTorch counterpart converts by rename alone.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from idmp_jax.models import quantize

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()


class Linear(nn.Module):
  """torch.nn.Linear. A LoRA adapter is used when the param tree holds `lora_a`/`lora_b` leaves beside the kernel
  (see `idmp_jax.models.lora`), and an int8/int4 kernel is dequantised when a `kernel_scale` leaf is beside it (see
  `idmp_jax.models.quantize`): the base module stays ignorant of which layers are adapted or quantised."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    from idmp_jax.models import lora  # Local import: lora imports this module.
    adapted = self.has_variable("params", "lora_a")
    quantized = self.has_variable("params", quantize.SCALE)  # int8 / int4 weights (idmp_jax.models.quantize).
    if quantized:
      kernel = self.get_variable("params", "kernel")  # int8 is stored (out, in): not the float param's shape.
      if quantize.kernel_in_out(kernel) != (x.shape[-1], self.features):
        raise ValueError(f"{'/'.join(self.scope.path)}: quantised kernel {kernel.dtype} {kernel.shape} does not map "
                         f"{x.shape[-1]} inputs to {self.features} outputs")
      y = quantize.matmul(x, kernel, self.get_variable("params", quantize.SCALE), self.dtype)
    else:
      kernel = self.param("kernel", default_kernel_init, (x.shape[-1], self.features), self.param_dtype)
      if adapted:
        y = lora.adapted_matmul(self, x, kernel)
      else:
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if adapted and quantized:
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


def _outer_axes(ndim: int, axes: tuple) -> tuple:
  """The reduced axes other than the last when the last is reduced too (GroupNorm's (B, HW, G, Cg) layout: the
  spatial axes, reduced per channel before the channels of a group are combined); () otherwise."""
  return tuple(a for a in axes if a != ndim - 1) if ndim - 1 in axes and len(axes) > 1 else ()


def _mean(t, axes):
  """t.mean(axes, keepdims=True); grouped axes as per-channel sums over the outer axes first (a column reduction,
  channels contiguous), then over the group's channels: the forward statistics' reduction order."""
  outer = _outer_axes(t.ndim, axes)
  if not outer:
    return t.mean(axis=axes, keepdims=True)
  n = math.prod(t.shape[a] for a in axes)
  return t.sum(axis=outer, keepdims=True).sum(axis=t.ndim - 1, keepdims=True) / n


def _normalize_fwd_stats(xf, axes, eps):
  """(mean, rsqrt(var + eps)) over `axes`, fp32. Rows (LayerNorm): two passes, mean then the mean of squared
  deviations. Groups: one pass over x for per-channel sums of (x - shift) and its square, shift = each channel's
  first element (so the sums stay small and the variance does not cancel), then the channels' means and squared
  deviations combined per group (Chan et al.'s pairwise formula): x is read once for its statistics, one
  reduction kernel where the two passes took two (H200 profile, BENCHMARKS.md)."""
  outer = _outer_axes(xf.ndim, axes)
  if not outer:
    mean = xf.mean(axis=axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)
  n = math.prod(xf.shape[a] for a in outer)
  shift = xf[tuple(slice(0, 1) if a in outer else slice(None) for a in range(xf.ndim))]
  d = xf - shift
  s1 = d.sum(axis=outer, keepdims=True)
  s2 = jnp.square(d).sum(axis=outer, keepdims=True)
  offset = s1 / n  # The channel's mean minus its shift.
  channel_mean = shift + offset
  channel_m2 = jnp.maximum(s2 - s1 * offset, 0.0)  # Sum of squared deviations from the channel's mean.
  mean = channel_mean.mean(axis=-1, keepdims=True)
  m2 = channel_m2.sum(axis=-1, keepdims=True) + n * jnp.square(channel_mean - mean).sum(axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(m2 / (n * xf.shape[-1]) + eps)


def _affine_act(xhat, scale, bias, silu: bool, dtype):
  y = xhat
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  y = y.astype(dtype)
  return (y, nn.silu(y)) if silu else (y, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def normalize(x, scale, bias, axes: tuple, eps: float, silu: bool, dtype):
  """((x - mean) * rsqrt(var + eps) * scale + bias).astype(dtype), then SiLU if `silu` (in `dtype`, as
  `nn.silu(GroupNorm(...)(x))` computes it); statistics in fp32 over `axes` of x; scale/bias (or None)
  broadcast against x's trailing axes. GroupNorm and LayerNorm are this over different axes.

  Why a custom VJP: the backward keeps only x (in its own dtype) and the (mean, rstd) per group, recomputes
  x-hat, and takes one reduction pass (the two group means below) and one elementwise pass, where autodiff of
  the two-pass statistics keeps fp32 residuals. Same gradient (tests/test_layers.py checks it against autodiff).
  Measured: the small UNet's LoRA step 10% faster on the CPU; the SD-2 step on an H200 unchanged (XLA:GPU
  already fuses autodiff's version well; BENCHMARKS.md)."""
  return _normalize_fwd(x, scale, bias, axes, eps, silu, dtype)[0]


def _normalize_fwd(x, scale, bias, axes, eps, silu, dtype):
  mean, rstd = _normalize_fwd_stats(x.astype(jnp.float32), axes, eps)
  out = _affine_act((x.astype(jnp.float32) - mean) * rstd, scale, bias, silu, dtype)[1]
  return out, (x, scale, bias, mean, rstd)


def _normalize_bwd(axes, eps, silu, dtype, res, g):
  x, scale, bias, mean, rstd = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy = g.astype(jnp.float32)
  if silu:  # d silu(y) / dy = s (1 + y (1 - s)), at the y the forward fed SiLU (rounded to dtype).
    y = _affine_act(xhat, scale, bias, False, dtype)[0].astype(jnp.float32)
    s = jax.nn.sigmoid(y)
    dy = dy * (s * (1.0 + y * (1.0 - s)))
  lead = lambda p: tuple(range(x.ndim - p.ndim))  # The axes a trailing-aligned scale/bias broadcasts over.
  dscale = None if scale is None else jnp.sum(dy * xhat, axis=lead(scale)).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(dy, axis=lead(bias)).astype(bias.dtype)
  dxhat = dy if scale is None else dy * scale.astype(jnp.float32)
  m1 = _mean(dxhat, axes)
  m2 = _mean(dxhat * xhat, axes)
  dx = rstd * (dxhat - m1 - xhat * m2)
  return dx.astype(x.dtype), dscale, dbias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


# Where `residual_layer_norm` runs: "auto" = `pallas_norm`'s kernels on a Triton GPU for the shapes they take, XLA
# elsewhere; "xla" = always XLA; "interpret" = the kernels interpreted (the tests, on the CPU). Read when traced.
NORM_KERNELS = "auto"


def _norm_kernels(rows: int, c: int) -> bool:
  if NORM_KERNELS == "xla":
    return False
  if NORM_KERNELS not in ("auto", "interpret"):
    raise ValueError(f"layers.NORM_KERNELS = {NORM_KERNELS!r}: expected 'auto', 'xla' or 'interpret'")
  from idmp_jax.models import attention, pallas_norm  # Local: Pallas only where it is used.
  if not pallas_norm.supported(rows, c):
    return False
  return NORM_KERNELS == "interpret" or attention.pallas_by_default()


def residual_layer_norm(x, delta, scale, bias, eps: float):
  """(h, y): h = x + delta in x's dtype (x itself when delta is None), y = LayerNorm(h) over the last axis (fp32
  statistics, `normalize`'s math) in x's dtype: the transformer block's residual stream and the norm that reads it.

  On a Triton GPU (`NORM_KERNELS`) one op whose backward receives h's cotangent (from the stream's later uses)
  together with y's and writes x's gradient, dh + LN'(h)^T dy, in one pass (delta's is the same array), both
  directions `pallas_norm`'s kernels: the forward writes h and y in one pass where XLA took three kernels.
  Elsewhere the add and `normalize`, as separate ops, for XLA to fuse as it does."""
  shape, c = x.shape, x.shape[-1]
  if delta is not None and delta.shape != shape:
    raise ValueError(f"residual_layer_norm: delta {delta.shape} is not the stream's shape {shape}")
  if _norm_kernels(math.prod(shape[:-1]), c):
    return _residual_layer_norm_kernels(x, delta, scale, bias, eps)
  h = x if delta is None else x + delta.astype(x.dtype)
  return h, normalize(h, scale, bias, (x.ndim - 1,), eps, False, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _residual_layer_norm_kernels(x, delta, scale, bias, eps: float):
  return _residual_layer_norm_fwd(x, delta, scale, bias, eps)[0]


def _residual_layer_norm_fwd(x, delta, scale, bias, eps):
  from idmp_jax.models import pallas_norm
  shape, c = x.shape, x.shape[-1]
  rows = math.prod(shape[:-1])
  h, y, mean, rstd = pallas_norm.forward(x.reshape(rows, c), None if delta is None else delta.reshape(rows, c),
                                         scale, bias, eps=eps, interpret=NORM_KERNELS == "interpret",
                                         **pallas_norm.tuning())
  h = x if h is None else h.reshape(shape)
  # The last residual says, by its pytree structure alone, whether there was a delta to give a gradient.
  return (h, y.reshape(shape)), (h, scale, bias, mean, rstd, None if delta is None else ())


def _residual_layer_norm_bwd(eps, res, cotangents):
  from idmp_jax.models import pallas_norm
  h, scale, bias, mean, rstd, had_delta = res
  dh, dy = cotangents
  shape, c = h.shape, h.shape[-1]
  rows = math.prod(shape[:-1])
  dx = pallas_norm.backward(h.reshape(rows, c), dy.reshape(rows, c), dh.reshape(rows, c), mean, rstd, scale,
                            interpret=NORM_KERNELS == "interpret", **pallas_norm.tuning()).reshape(shape)
  # The affine parameters' gradients as XLA expressions: dead (and dropped) when they are frozen.
  stats = (mean.reshape(*shape[:-1], 1), rstd.reshape(*shape[:-1], 1))
  _, dscale, dbias = _normalize_bwd((h.ndim - 1,), eps, False, h.dtype, (h, scale, bias, *stats), dy)
  return dx, (None if had_delta is None else dx), dscale, dbias


_residual_layer_norm_kernels.defvjp(_residual_layer_norm_fwd, _residual_layer_norm_bwd)


def _normal_cdf(x):
  return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def gelu(x):
  """Exact (erf) GELU, x * Phi(x), computed in fp32 and rounded once to x's dtype, as PyTorch's GELU computes in
  fp32 for half inputs. Why not jax.nn.gelu(approximate=False): it evaluates erfc in the input's dtype, which XLA
  expands into a two-branch polynomial with an exp and two divisions per element; on an H200 that made the SD-2
  UNet's GEGLU forward compute-bound (558 us for a 64x64-level call that moves 1 GB)."""
  xf = x.astype(jnp.float32)
  return (xf * _normal_cdf(xf)).astype(x.dtype)


@jax.custom_vjp
def geglu(h):
  """value * gelu(gate) (exact, erf) for (value, gate) = the two halves of h's last axis: diffusers' GEGLU after
  its projection, in fp32 and rounded once. Why a custom VJP: the backward keeps only h (the projection's output,
  alive anyway) and recomputes gelu(gate) and its derivative in fp32 in the one pass that writes dh, where autodiff
  keeps gelu(gate) as an extra residual and writes the two halves' gradients before concatenating them. On an H200
  at b32 the SD-2 UNet's GEGLU forward + backward went 9.7 -> 6.0 ms and its LoRA step's memory 25.4 -> 22.6 GiB."""
  value, gate = jnp.split(h.astype(jnp.float32), 2, axis=-1)
  return (value * gate * _normal_cdf(gate)).astype(h.dtype)


def _geglu_fwd(h):
  return geglu(h), h


def _geglu_bwd(h, g):
  value, gate = jnp.split(h.astype(jnp.float32), 2, axis=-1)
  cdf = _normal_cdf(gate)
  pdf = jnp.exp(-0.5 * jnp.square(gate)) * (1.0 / math.sqrt(2.0 * math.pi))
  g = g.astype(jnp.float32)
  return (jnp.concatenate([g * gate * cdf, g * value * (cdf + gate * pdf)], axis=-1).astype(h.dtype),)


geglu.defvjp(_geglu_fwd, _geglu_bwd)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-last inputs; statistics in fp32 whatever the compute dtype. `activation`
  "silu" applies SiLU after it inside the same op (the resnet pattern), so the backward is one fused op too."""
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: str | None = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
    if self.activation not in (None, "silu"):
      raise ValueError(f"GroupNorm: activation must be None or 'silu', got {self.activation!r}")
    g, cg = self.num_groups, c // self.num_groups
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    shape = x.shape
    xg = x.reshape(shape[0], -1, g, cg)
    y = normalize(xg, scale.reshape(g, cg), bias.reshape(g, cg), (1, 3), self.epsilon,
                  self.activation == "silu", self.dtype)
    return y.reshape(shape)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; statistics in fp32."""
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, delta=None, *, residual: bool = False):
    """LayerNorm(x); with `residual`, (h, LayerNorm(h)) for the stream h = x + delta (x when delta is None), as
    `residual_layer_norm` (its backward adds h's cotangent into x's gradient in the same pass), in x's dtype."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype) if self.use_scale else None
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype) if self.use_bias else None
    if not residual:
      if delta is not None:
        raise ValueError("LayerNorm: delta is only taken with residual=True")
      return normalize(x, scale, bias, (x.ndim - 1,), self.epsilon, False, self.dtype)
    return residual_layer_norm(x.astype(self.dtype), None if delta is None else delta.astype(self.dtype),
                               jnp.ones((c,), self.param_dtype) if scale is None else scale,
                               jnp.zeros((c,), self.param_dtype) if bias is None else bias, self.epsilon)


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

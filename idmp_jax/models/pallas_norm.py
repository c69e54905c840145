"""LayerNorm with the residual stream's add, forward and backward, as Pallas (Triton) kernels: the GPU
implementation of `layers.residual_layer_norm` (h = x + delta; y = LayerNorm(h)), one row block per program with the
whole row in registers.

Why: in the SD-2 UNet's transformer blocks at b32 XLA spends three kernels on each residual add + LayerNorm forward
(the statistics reduction reading x and delta, the normalisation reading them again, the add written by a third)
and streams the backward's one fusion (h, dy and h's cotangent read, dx written) at ~2 TB/s, where its plain copies
run at 3.6 (H200 profile, BENCHMARKS.md). Here:

  `forward`   (x, delta) -> (h, y, mean, rstd): one read of each input, one write of h and y.
  `backward`  (h, dy, dh, mean, rstd) -> dx = dh + LN'(h)^T dy: one read of each, one write.

Rows are power-of-two tiles of the channel width (Triton's tensors are powers of two), the columns past it masked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Channels a row may hold (in registers, with its cotangents in the backward): the UNet's 320-1280 and some room.
MAX_CHANNELS = 2048
# Elements of a program's (rows, padded channels) tile (rows per program = TILE // padded channels) and its warps:
# what `tuning` gives the model's calls. Read when a step is traced. One warp on 1024 elements (2 rows at C = 320,
# one row at 640 and 1280) beat 4 warps on 4096 in most (level, pass) cells of the b32 probe and by 0.43 ms in the
# step, paired (H200, BENCHMARKS.md, 2026-12-03).
TILE = 1024
WARPS = 1


def padded(c: int) -> int:
  return 1 << max(c - 1, 0).bit_length()


def block_rows(rows: int, c: int, tile: int = TILE) -> int:
  """Rows per program: tile / padded width, halved until it divides `rows` (1 at the least)."""
  br = max(tile // padded(c), 1)
  while rows % br:
    br //= 2
  return br


def supported(rows: int, c: int) -> bool:
  return 0 < c <= MAX_CHANNELS and rows > 0 and rows < 2**31 // max(c, 1)


def _tile(br: int, c: int, cp: int):
  """(row offsets within the program's block, column indices, the (br, cp) mask of real columns)."""
  rows = pl.program_id(0) * br + jnp.arange(br)
  cols = jnp.arange(cp)
  return rows, cols, jnp.broadcast_to(cols[None, :] < c, (br, cp))


def _forward_kernel(*refs, c: int, cp: int, br: int, eps: float, has_delta: bool):
  if has_delta:
    x_ref, d_ref, scale_ref, bias_ref, h_ref, y_ref, mean_ref, rstd_ref = refs
  else:
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
  rows, cols, mask = _tile(br, c, cp)
  at = (rows[:, None], cols[None, :])
  h = plgpu.load(x_ref.at[at], mask=mask, other=0.0)
  if has_delta:  # Rounded to the stream's dtype, as the add in XLA: the statistics are of the stored h.
    h = (h.astype(jnp.float32) + plgpu.load(d_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)).astype(h.dtype)
    plgpu.store(h_ref.at[at], h, mask=mask)
  hf = h.astype(jnp.float32)
  mean = jnp.sum(hf, axis=1) / c
  dev = jnp.where(mask, hf - mean[:, None], 0.0)
  rstd = jax.lax.rsqrt(jnp.sum(dev * dev, axis=1) / c + eps)
  col_mask = cols < c
  scale = plgpu.load(scale_ref.at[cols], mask=col_mask, other=0.0).astype(jnp.float32)
  bias = plgpu.load(bias_ref.at[cols], mask=col_mask, other=0.0).astype(jnp.float32)
  y = dev * rstd[:, None] * scale[None, :] + bias[None, :]
  plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
  plgpu.store(mean_ref.at[rows], mean)
  plgpu.store(rstd_ref.at[rows], rstd)


def _backward_kernel(h_ref, dy_ref, dh_ref, mean_ref, rstd_ref, scale_ref, dx_ref, *, c: int, cp: int, br: int):
  rows, cols, mask = _tile(br, c, cp)
  at = (rows[:, None], cols[None, :])
  mean = plgpu.load(mean_ref.at[rows])
  rstd = plgpu.load(rstd_ref.at[rows])
  scale = plgpu.load(scale_ref.at[cols], mask=cols < c, other=0.0).astype(jnp.float32)
  h = plgpu.load(h_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
  xhat = jnp.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
  g = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32) * scale[None, :]
  m1 = jnp.sum(g, axis=1) / c
  m2 = jnp.sum(g * xhat, axis=1) / c
  dx = rstd[:, None] * (g - m1[:, None] - xhat * m2[:, None])
  dx = dx + plgpu.load(dh_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
  plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)


def tuning() -> dict:
  """The keyword arguments (tile, num_warps) the model passes `forward` and `backward`: TILE and WARPS as they are
  when the step is traced (a default argument would keep their values at import)."""
  return dict(tile=TILE, num_warps=WARPS)


def _check(x, what: str):
  if x.ndim != 2 or not supported(*x.shape):
    raise ValueError(f"LayerNorm {what} kernel: input {x.shape} is not (rows, C) with C <= {MAX_CHANNELS}")


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps", "tile"))
def forward(x, delta, scale, bias, *, eps: float, interpret: bool = False, num_warps: int = WARPS, tile: int = TILE):
  """(h, y, mean, rstd) for x (rows, C) and delta (rows, C) or None: h = x + delta (None when delta is None), y =
  (h - mean) * rstd * scale + bias in x's dtype, mean and rstd (rows,) fp32 over each row."""
  _check(x, "forward")
  rows, c = x.shape
  cp, br = padded(c), block_rows(rows, c, tile)
  has_delta = delta is not None
  stats = jax.ShapeDtypeStruct((rows,), jnp.float32)
  out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype)] if has_delta else []) + [
      jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats]
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, c=c, cp=cp, br=br, eps=eps, has_delta=has_delta),
      grid=(rows // br,), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="layer_norm_forward",
  )(x, *([delta.astype(x.dtype)] if has_delta else []), scale, bias)
  return tuple(outs) if has_delta else (None, *outs)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "tile"))
def backward(h, dy, dh, mean, rstd, scale, *, interpret: bool = False, num_warps: int = WARPS, tile: int = TILE):
  """dx = dh + the LayerNorm's input gradient for the output cotangent dy, at h with its (mean, rstd); in h's dtype,
  summed in fp32 and rounded once."""
  _check(h, "backward")
  rows, c = h.shape
  cp, br = padded(c), block_rows(rows, c, tile)
  return pl.pallas_call(
      functools.partial(_backward_kernel, c=c, cp=cp, br=br),
      grid=(rows // br,), out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="layer_norm_backward",
  )(h, dy.astype(h.dtype), dh.astype(h.dtype), mean, rstd, scale)

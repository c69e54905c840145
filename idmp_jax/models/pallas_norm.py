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
# Elements of a program's (rows, padded channels) tile: rows per program = TILE // padded channels.
TILE = 4096
# Most pieces a "split" row may have (`pieces`).
MAX_PIECES = 3
# The layout of a row in registers (`pieces`) that `tuning` gives the model's calls. Read when a step is traced.
LAYOUT = "masked"


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


def pieces(c: int, layout: str) -> tuple[tuple[int, int, int], ...]:
  """The row's columns as the kernels hold them: (start, width, valid) tiles, widths powers of two.

  "masked": one tile of the padded width, the columns past C masked (at the UNet's 5 * 2^k channels 37.5% of its
  lanes idle). "split": C's binary digits, largest first (320 = 256 + 64), every lane real; for C with at most
  `MAX_PIECES` digits, none under 16 columns (else masked)."""
  if layout == "split":
    widths = [1 << b for b in reversed(range(c.bit_length())) if c >> b & 1]
    if len(widths) <= MAX_PIECES and widths[-1] >= 16:
      starts = [sum(widths[:i]) for i in range(len(widths))]
      return tuple((s, w, w) for s, w in zip(starts, widths))
  elif layout != "masked":
    raise ValueError(f"LayerNorm kernel layout {layout!r}: expected 'masked' or 'split'")
  return ((0, padded(c), c),)


def _load(ref, row0, br: int, piece):
  """ref's (br, width) tile at rows [row0, row0 + br) of a piece, fp32, masked columns 0."""
  start, width, valid = piece
  if valid == width:
    return ref[pl.ds(row0, br), pl.ds(start, width)].astype(jnp.float32)
  rows = row0 + jnp.arange(br)
  cols = start + jnp.arange(width)
  mask = jnp.broadcast_to(cols[None, :] < start + valid, (br, width))
  return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0).astype(jnp.float32)


def _store(ref, row0, br: int, piece, value):
  start, width, valid = piece
  value = value.astype(ref.dtype)
  if valid == width:
    ref[pl.ds(row0, br), pl.ds(start, width)] = value
    return
  rows = row0 + jnp.arange(br)
  cols = start + jnp.arange(width)
  mask = jnp.broadcast_to(cols[None, :] < start + valid, (br, width))
  plgpu.store(ref.at[rows[:, None], cols[None, :]], value, mask=mask)


def _vector(ref, piece):
  """A (width,) piece of a per-channel vector (scale, bias), fp32, masked columns 0."""
  start, width, valid = piece
  if valid == width:
    return ref[pl.ds(start, width)].astype(jnp.float32)
  cols = start + jnp.arange(width)
  return plgpu.load(ref.at[cols], mask=cols < start + valid, other=0.0).astype(jnp.float32)


def _valid(br: int, piece):
  """The (br, width) mask of a piece's real columns (None when all are)."""
  _, width, valid = piece
  return None if valid == width else jnp.broadcast_to(jnp.arange(width)[None, :] < valid, (br, width))


def _forward_kernel(*refs, c: int, parts, br: int, eps: float, has_delta: bool):
  if has_delta:
    x_ref, d_ref, scale_ref, bias_ref, h_ref, y_ref, mean_ref, rstd_ref = refs
  else:
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = refs
  row0 = pl.program_id(0) * br
  hs = []
  for piece in parts:
    h = _load(x_ref, row0, br, piece)
    if has_delta:  # Rounded to the stream's dtype, as the add in XLA: the statistics are of the stored h.
      h = (h + _load(d_ref, row0, br, piece)).astype(h_ref.dtype)
      _store(h_ref, row0, br, piece, h)
      h = h.astype(jnp.float32)
    hs.append(h)
  mean = sum(jnp.sum(h, axis=1) for h in hs) / c
  devs = []
  for piece, h in zip(parts, hs):
    dev = h - mean[:, None]
    mask = _valid(br, piece)
    devs.append(dev if mask is None else jnp.where(mask, dev, 0.0))
  rstd = jax.lax.rsqrt(sum(jnp.sum(d * d, axis=1) for d in devs) / c + eps)
  for piece, dev in zip(parts, devs):
    y = dev * rstd[:, None] * _vector(scale_ref, piece)[None, :] + _vector(bias_ref, piece)[None, :]
    _store(y_ref, row0, br, piece, y)
  mean_ref[pl.ds(row0, br)] = mean
  rstd_ref[pl.ds(row0, br)] = rstd


def _backward_kernel(h_ref, dy_ref, dh_ref, mean_ref, rstd_ref, scale_ref, dx_ref, *, c: int, parts, br: int):
  row0 = pl.program_id(0) * br
  mean = mean_ref[pl.ds(row0, br)]
  rstd = rstd_ref[pl.ds(row0, br)]
  xhats, gs = [], []
  for piece in parts:
    xhat = (_load(h_ref, row0, br, piece) - mean[:, None]) * rstd[:, None]
    mask = _valid(br, piece)
    xhats.append(xhat if mask is None else jnp.where(mask, xhat, 0.0))
    gs.append(_load(dy_ref, row0, br, piece) * _vector(scale_ref, piece)[None, :])
  m1 = sum(jnp.sum(g, axis=1) for g in gs) / c
  m2 = sum(jnp.sum(g * xhat, axis=1) for g, xhat in zip(gs, xhats)) / c
  for piece, g, xhat in zip(parts, gs, xhats):
    dx = rstd[:, None] * (g - m1[:, None] - xhat * m2[:, None]) + _load(dh_ref, row0, br, piece)
    _store(dx_ref, row0, br, piece, dx)


def tuning(direction: str, rows: int, c: int) -> dict:
  """The keyword arguments (layout, tile, num_warps) for `forward` or `backward` on a (rows, C) stream."""
  del direction, rows, c
  return dict(layout=LAYOUT, tile=TILE, num_warps=4)


def _check(x, what: str):
  if x.ndim != 2 or not supported(*x.shape):
    raise ValueError(f"LayerNorm {what} kernel: input {x.shape} is not (rows, C) with C <= {MAX_CHANNELS}")


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps", "tile", "layout"))
def forward(x, delta, scale, bias, *, eps: float, interpret: bool = False, num_warps: int = 4, tile: int = TILE,
            layout: str = "masked"):
  """(h, y, mean, rstd) for x (rows, C) and delta (rows, C) or None: h = x + delta (None when delta is None), y =
  (h - mean) * rstd * scale + bias in x's dtype, mean and rstd (rows,) fp32 over each row."""
  _check(x, "forward")
  rows, c = x.shape
  br = block_rows(rows, c, tile)
  has_delta = delta is not None
  stats = jax.ShapeDtypeStruct((rows,), jnp.float32)
  out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype)] if has_delta else []) + [
      jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats]
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, c=c, parts=pieces(c, layout), br=br, eps=eps, has_delta=has_delta),
      grid=(rows // br,), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="layer_norm_forward",
  )(x, *([delta.astype(x.dtype)] if has_delta else []), scale, bias)
  return tuple(outs) if has_delta else (None, *outs)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "tile", "layout"))
def backward(h, dy, dh, mean, rstd, scale, *, interpret: bool = False, num_warps: int = 4, tile: int = TILE,
             layout: str = "masked"):
  """dx = dh + the LayerNorm's input gradient for the output cotangent dy, at h with its (mean, rstd); in h's dtype,
  summed in fp32 and rounded once."""
  _check(h, "backward")
  rows, c = h.shape
  br = block_rows(rows, c, tile)
  return pl.pallas_call(
      functools.partial(_backward_kernel, c=c, parts=pieces(c, layout), br=br),
      grid=(rows // br,), out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="layer_norm_backward",
  )(h, dy.astype(h.dtype), dh.astype(h.dtype), mean, rstd, scale)

"""The LoRA adapters' input side with their dropout masks made in registers, as Pallas (Triton) kernels: the GPU
implementation of `lora._lora_matmuls`' [x | h_1 | ... | h_n] operand (h_i = scale_i * dropout_i(x) A_i) and of
the adapters' dA_i = dropout_i(x)^T dh_i, for n adapters on one input (self-attention's to_q/k/v: n = 3).

In XLA each adapter's dropout(x) is written out and read back by its rank-r GEMM (XLA's Triton GEMM fusion does
not take the hash-mask producer), [x | h...] is one more pass, and the backward keeps every dropout(x) for dA: at
the 64x64 level of the SD-2 UNet at b32 ~0.6 ms of such passes per transformer block (H200 profile, BENCHMARKS.md).
Here:

  `down`       x -> [x | h_1 | ... | h_n]: one read of x, one write of the result, the n masks made per tile.
  `down_grad`  (x, dh_1..n) -> dA_1..n: one read of x (from [x | h...]) and of the dh's, the masks made again;
               nothing of dropout(x) is kept between the passes.
  `up_grad`    ([dy_i W_i^T | dy_i B_i^T])_i -> dx = sum_i dy_i W_i^T + dropout_i(dh_i A_i^T): one read of each,
               one write of dx (for adapters sharing x, `UP_GRAD_MIN_ADAPTERS`).

The masks are `lora._apply_dropout`'s: one hash per pair of elements (columns j and j + K/2 of a row), so one
(block_m, 32) hash tile gives the masks of the tile's columns [c, c + 32) and [K/2 + c, K/2 + c + 32), which is why
a program walks the two halves of the row together. The kernels and the XLA path drop the same elements.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from idmp_jax.models import lora

BLOCK_K = 32  # Columns per half-tile (a hash tile's width).
MAX_ADAPTERS = 4
# down_grad: programs to aim for (row splits x column blocks), each summing its rows' dA into an fp32 partial. At 320
# programs (64 row splits) the 64x64 level's q/k/v dA took 233 us on an H200 (b32): too few warps in flight to
# hide the loads; at ~2048, 181-204 us (XLA remaking the masks: 245-284).
BACKWARD_PROGRAMS = 2048
# `down` has one program per 128 rows: below ~256 programs it loses to XLA (H200, b32, K = 1280: 8192 rows 172-179
# us against 132 for q/k/v; 2048 rows 112-160 against 61), above it wins (131072 x 320: 151 against 305 us;
# 32768 x 640: 111 against 185), so `lora` takes it from this many rows.
FORWARD_MIN_ROWS = 32768
# `up_grad` (the backward's dx) for this many adapters sharing x and more, where `down` ran: it reads each
# [dy W^T | dy B^T] once where XLA writes and reads back every dh A^T at full width. H200, b32
# (lora_kernels_probe): q/k/v at 32768 x 640 188 us against XLA's 276, at 131072 x 320 327 against 326; one
# adapter at 131072 x 320 192 against 175, hence not for one.
UP_GRAD_MIN_ADAPTERS = 2
# Only input widths measured against XLA (the UNet's 320-1280); LLaVA's 4096-wide projections stay on XLA's path.
MAX_MEASURED_K = 1280


def block_m(rows: int) -> int:
  """The largest row block of (128, 64) dividing `rows` (0: none)."""
  return next((b for b in (128, 64) if rows % b == 0), 0)


def supported(rows: int, k: int, r: int, n: int = 1) -> bool:
  """Shapes the kernels take: rows in whole 64- or 128-row blocks, K a multiple of 64 (two halves of whole 32-column
  tiles), a power-of-two rank in [16, 128] (the tensor-core dot's smallest side is 16), 1-4 adapters, and pair
  indices below 2^32 (the mask's counter)."""
  return (bool(block_m(rows)) and k > 0 and k % (2 * BLOCK_K) == 0 and 16 <= r <= 128 and not r & (r - 1)
          and 1 <= n <= MAX_ADAPTERS and rows * (k // 2) < 2**32)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """a @ b (either transposed) with fp32 accumulation; fp32 operands at full precision (the tests' parity)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked(x, bits, cut, factor):
  return jnp.where(bits >= cut, x * factor, jnp.zeros_like(x))


def _pairs(row0, bm: int, half: int, col0):
  """(bm, BLOCK_K) uint32 pair indices of the tile at rows [row0, row0 + bm), columns [col0, col0 + BLOCK_K)."""
  rows = (row0 + jax.lax.broadcasted_iota(jnp.int32, (bm, BLOCK_K), 0)).astype(jnp.uint32)
  cols = (col0 + jax.lax.broadcasted_iota(jnp.int32, (bm, BLOCK_K), 1)).astype(jnp.uint32)
  return rows * jnp.uint32(half) + cols


def _down_kernel(x_ref, a_ref, seed_ref, cut_ref, factor_ref, scale_ref, xh_ref, *, k: int, n: int, bm: int):
  # x_ref: (bm, K) rows of x; a_ref: (n, K, r); the four scalar refs: (n,) per adapter; xh_ref: (bm, K + n r).
  half, r = k // 2, a_ref.shape[-1]
  row0 = pl.program_id(0) * bm
  seeds = [seed_ref[i] for i in range(n)]
  cuts = [cut_ref[i] for i in range(n)]
  factors = [factor_ref[i].astype(x_ref.dtype) for i in range(n)]

  def body(c, accs):
    col0 = pl.multiple_of(c * BLOCK_K, BLOCK_K)
    lo, hi = pl.ds(col0, BLOCK_K), pl.ds(pl.multiple_of(half + col0, BLOCK_K), BLOCK_K)
    x_lo, x_hi = x_ref[:, lo], x_ref[:, hi]
    xh_ref[:, lo] = x_lo
    xh_ref[:, hi] = x_hi
    pairs = _pairs(row0, bm, half, col0)
    out = []
    for i in range(n):
      low, high = lora.keep_bits(pairs, seeds[i])
      out.append(accs[i] + _dot(_masked(x_lo, low, cuts[i], factors[i]), a_ref[i, lo, :])
                 + _dot(_masked(x_hi, high, cuts[i], factors[i]), a_ref[i, hi, :]))
    return tuple(out)

  accs = jax.lax.fori_loop(0, half // BLOCK_K, body, tuple(jnp.zeros((bm, r), jnp.float32) for _ in range(n)))
  for i in range(n):  # As the XLA path rounds: the product in the compute dtype, then the scale in it.
    xh_ref[:, pl.ds(k + i * r, r)] = accs[i].astype(xh_ref.dtype) * scale_ref[i].astype(xh_ref.dtype)


def _down_grad_kernel(xh_ref, dh_ref, seed_ref, cut_ref, factor_ref, da_ref, *, k: int, n: int, bm: int,
                      blocks: int):
  # Program (split, column block c): rows [split * blocks * bm, ...) in `blocks` row blocks; columns [c0, c0 + 32)
  # and [K/2 + c0, ...). xh_ref: (rows, K + ...), x in its first K columns; dh_ref: (n, rows, r); da_ref: (n, K, r),
  # this split's partial sums (the split's programs write disjoint column blocks of it).
  half, r = k // 2, dh_ref.shape[-1]
  col0 = pl.multiple_of(pl.program_id(1) * BLOCK_K, BLOCK_K)
  first = pl.program_id(0) * blocks  # (Program ids outside the loop: the interpreter takes them only there.)
  lo, hi = pl.ds(col0, BLOCK_K), pl.ds(pl.multiple_of(half + col0, BLOCK_K), BLOCK_K)
  seeds = [seed_ref[i] for i in range(n)]
  cuts = [cut_ref[i] for i in range(n)]
  factors = [factor_ref[i].astype(xh_ref.dtype) for i in range(n)]

  def body(b, accs):
    row0 = pl.multiple_of((first + b) * bm, bm)
    rows = pl.ds(row0, bm)
    x_lo, x_hi = xh_ref[rows, lo], xh_ref[rows, hi]
    pairs = _pairs(row0, bm, half, col0)
    out = []
    for i in range(n):
      low, high = lora.keep_bits(pairs, seeds[i])
      dh = dh_ref[i, rows, :]
      out.append(accs[2 * i] + _dot(_masked(x_lo, low, cuts[i], factors[i]), dh, trans_a=True))
      out.append(accs[2 * i + 1] + _dot(_masked(x_hi, high, cuts[i], factors[i]), dh, trans_a=True))
    return tuple(out)

  zeros = tuple(jnp.zeros((BLOCK_K, r), jnp.float32) for _ in range(2 * n))
  accs = jax.lax.fori_loop(0, blocks, body, zeros)
  for i in range(n):
    da_ref[i, lo, :] = accs[2 * i]
    da_ref[i, hi, :] = accs[2 * i + 1]


def _up_grad_kernel(*refs, k: int, n: int, bm: int):
  # refs: n dxh_i (bm, K + r) = [dy_i W_i^T | dy_i B_i^T]; a_ref (n, K, r); the four scalar refs (n,); dx_ref (bm, K).
  dxh_refs, (a_ref, seed_ref, cut_ref, factor_ref, scale_ref, dx_ref) = refs[:n], refs[n:]
  half, r, dtype = k // 2, a_ref.shape[-1], dx_ref.dtype
  row0 = pl.program_id(0) * bm
  seeds = [seed_ref[i] for i in range(n)]
  cuts = [cut_ref[i] for i in range(n)]
  factors = [factor_ref[i].astype(dtype) for i in range(n)]
  # dh_i = scale_i * dy_i B_i^T in the compute dtype, as the XLA path rounds it.
  dhs = [dxh_refs[i][:, pl.ds(k, r)] * scale_ref[i].astype(dtype) for i in range(n)]

  def body(c, carry):
    col0 = pl.multiple_of(c * BLOCK_K, BLOCK_K)
    lo, hi = pl.ds(col0, BLOCK_K), pl.ds(pl.multiple_of(half + col0, BLOCK_K), BLOCK_K)
    pairs = _pairs(row0, bm, half, col0)
    out_lo = out_hi = None
    for i in range(n):  # dx = sum_i dy_i W_i^T + dropout_i(dh_i A_i^T), in the XLA path's order and dtype.
      low, high = lora.keep_bits(pairs, seeds[i])
      back_lo = _dot(dhs[i], a_ref[i, lo, :], trans_b=True).astype(dtype)
      back_hi = _dot(dhs[i], a_ref[i, hi, :], trans_b=True).astype(dtype)
      d_lo = dxh_refs[i][:, lo] + _masked(back_lo, low, cuts[i], factors[i])
      d_hi = dxh_refs[i][:, hi] + _masked(back_hi, high, cuts[i], factors[i])
      out_lo, out_hi = (d_lo, d_hi) if out_lo is None else (out_lo + d_lo, out_hi + d_hi)
    dx_ref[:, lo] = out_lo.astype(dtype)
    dx_ref[:, hi] = out_hi.astype(dtype)
    return carry

  jax.lax.fori_loop(0, half // BLOCK_K, body, 0)


def _scalars(rates, seeds, scales=None):
  """Per-adapter (n,) arrays: mixed seed (uint32), cut (uint32), factor (fp32)[, scale (fp32)]."""
  cuts, factors = zip(*(lora.dropout_cut(rate) for rate in rates))
  out = [jnp.stack([lora.mixed_seed(s) for s in seeds]), jnp.stack(cuts), jnp.stack(factors).astype(jnp.float32)]
  if scales is not None:
    out.append(jnp.stack([jnp.asarray(s, jnp.float32) for s in scales]))
  return out


def _check(x_shape, a_shape, what: str):
  rows, k = x_shape
  if len(a_shape) != 3 or a_shape[1] != k or not supported(rows, k, a_shape[2], a_shape[0]):
    raise ValueError(f"LoRA {what} kernel: input {tuple(x_shape)}, A {tuple(a_shape)} (n, K, r) outside what the "
                     "kernels take (pallas_lora.supported)")


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages"))
def down(x, a, rates, seeds, scales, *, interpret: bool = False, num_warps: int | None = None, num_stages: int = 2):
  """[x | h_1 | ... | h_n], h_i = scales[i] * dropout_i(x) @ a[i], for x (rows, K), a (n, K, r) in x's dtype;
  dropout_i as `lora._apply_dropout` with rates[i] () and seeds[i] (2,) uint32. num_warps: 4 for several adapters,
  8 for one unless given (H200, b32: q/k/v at 131072 x 320 151 us with 4 warps against 183 with 8; one adapter 105
  against 116, at 32768 x 640 85 against 101)."""
  if x.ndim != 2:
    raise ValueError(f"LoRA forward kernel: input {x.shape} is not (rows, K)")
  _check(x.shape, a.shape, "forward")
  rows, k = x.shape
  n, _, r = a.shape
  bm = block_m(rows)
  num_warps = num_warps or (4 if n > 1 else 8)
  vec = pl.BlockSpec((n,), lambda i: (0,))
  return pl.pallas_call(
      functools.partial(_down_kernel, k=k, n=n, bm=bm),
      grid=(rows // bm,),
      in_specs=[pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((n, k, r), lambda i: (0, 0, 0))] + [vec] * 4,
      out_specs=pl.BlockSpec((bm, k + n * r), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, k + n * r), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="lora_down",
  )(x, a.astype(x.dtype), *_scalars(rates, seeds, scales))


@functools.partial(jax.jit, static_argnames=("k", "interpret", "num_warps", "num_stages"))
def down_grad(xh, dh, rates, seeds, *, k: int, interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """dA_i = dropout_i(x)^T dh[i] (fp32, (n, K, r)) for x = xh[:, :K] (the operand `down` wrote) and dh (n, rows,
  r) in xh's dtype, the masks as `down` drew them."""
  rows = xh.shape[0]
  n, _, r = dh.shape
  if dh.shape[1] != rows or xh.shape[1] < k:
    raise ValueError(f"LoRA backward kernel: dh {dh.shape} does not fit the operand {xh.shape} (K = {k})")
  _check((rows, k), (n, k, r), "backward")
  bm = block_m(rows)
  blocks = rows // bm
  splits = max(1, min(blocks, BACKWARD_PROGRAMS // (k // 2 // BLOCK_K)))
  while blocks % splits:
    splits -= 1
  full = lambda *shape: pl.BlockSpec(shape, lambda s, c: (0,) * len(shape))
  da = pl.pallas_call(
      functools.partial(_down_grad_kernel, k=k, n=n, bm=bm, blocks=blocks // splits),
      grid=(splits, k // 2 // BLOCK_K),
      in_specs=[full(*xh.shape), full(n, rows, r)] + [full(n)] * 3,
      out_specs=pl.BlockSpec((None, n, k, r), lambda s, c: (s, 0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((splits, n, k, r), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="lora_down_grad",
  )(xh, dh.astype(xh.dtype), *_scalars(rates, seeds))
  return jnp.sum(da, axis=0)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "num_warps", "num_stages"))
def up_grad(dxhs, a, rates, seeds, scales, *, k: int, interpret: bool = False, num_warps: int = 4,
            num_stages: int = 2):
  """dx = sum_i (dxh_i[:, :K] + dropout_i(scales[i] * dxh_i[:, K:] @ a[i]^T)) for the n adapters `down` served:
  dxh_i (rows, K + r) = dy_i [W_i; B_i]^T (the backward's one GEMM per layer), a (n, K, r); the masks as `down`
  drew them. One read of each dxh_i and one write of dx, where XLA writes each dh_i A_i^T at full width and reads
  it back to mask and add it."""
  n, _, r = a.shape
  if len(dxhs) != n or len({tuple(d.shape) for d in dxhs}) != 1 or dxhs[0].ndim != 2 or dxhs[0].shape[1] != k + r:
    raise ValueError(f"LoRA backward kernel: cotangents {[tuple(d.shape) for d in dxhs]} do not fit A {a.shape} "
                     f"(n arrays of (rows, K + r), K = {k})")
  rows = dxhs[0].shape[0]
  _check((rows, k), a.shape, "backward")
  bm = block_m(rows)
  vec = pl.BlockSpec((n,), lambda i: (0,))
  dtype = dxhs[0].dtype
  return pl.pallas_call(
      functools.partial(_up_grad_kernel, k=k, n=n, bm=bm),
      grid=(rows // bm,),
      in_specs=[pl.BlockSpec((bm, k + r), lambda i: (i, 0))] * n
      + [pl.BlockSpec((n, k, r), lambda i: (0, 0, 0))] + [vec] * 4,
      out_specs=pl.BlockSpec((bm, k), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, k), dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="lora_up_grad",
  )(*dxhs, a.astype(dtype), *_scalars(rates, seeds, scales))


# ---------------------------------------------------------------------------------------------------------------
# The transformer block's LayerNorm fused with the adapters that read its output (self-attention's q/k/v after
# norm1, cross-attention's q after norm2): `norm_down` writes the stream h = x + delta, [y | h_1 | ... | h_n] for
# y = LayerNorm(h) and the row statistics in one pass, where `pallas_norm.forward` wrote y and `down` read it back;
# `norm_up_grad` takes the adapters' dx and the LayerNorm's backward in one pass, where `up_grad` (or XLA, for one
# adapter) wrote the LayerNorm's output cotangent and `pallas_norm.backward` read it back. At the 64x64 level of the
# SD-2 UNet at b32 each fusion drops a 84 MB write and read. A program holds NORM_BLOCK_ROWS whole rows (the
# tensor-core dot wants 16 rows at the least) in registers, each half-row [0, K/2), [K/2, K) (the dropout mask's
# pairs) as power-of-two pieces (160 = 128 + 32): no padded lanes, whose hashing and dot work cost the kernels more
# than they saved (a first version padding each half to 256 lanes ran the 64x64 q/k/v forward at 323 us against 235
# for the two unfused kernels, H200).
NORM_BLOCK_ROWS = 16
NORM_MAX_K = 2048


def norm_supported(rows: int, k: int, r: int, n: int = 1, block_rows: int = NORM_BLOCK_ROWS) -> bool:
  return supported(rows, k, r, n) and rows % block_rows == 0 and k <= NORM_MAX_K


def _norm_warps(k: int, block_rows: int) -> int:
  # ~40 elements of the program's rows per thread: 4 warps at K = 320 (16 x 320), 8 from K = 640.
  return max(4, min(8, block_rows * k // 1280))


def _row_pieces(k: int):
  """(first column, its column within the half, width, upper half) of each power-of-two piece of a row: each half
  [0, K/2), [K/2, K) split by the binary digits of K/2, largest first."""
  half = k // 2
  widths = [1 << b for b in reversed(range(half.bit_length())) if half >> b & 1]
  offsets = [sum(widths[:j]) for j in range(len(widths))]
  return [(start + off, off, w, start > 0) for start in (0, half) for off, w in zip(offsets, widths)]


def _rows(bm: int):
  return pl.program_id(0) * bm + jnp.arange(bm)


def _piece(rows, c0: int, w: int):
  return rows[:, None], (c0 + jnp.arange(w))[None, :]


def _piece_bits(rows, half: int, off: int, w: int, upper: bool, seed):
  """The dropout mask's 16 bits for a piece: hash(row * K/2 + column within the half), low half for [0, K/2)."""
  pairs = rows[:, None].astype(jnp.uint32) * jnp.uint32(half) + (off + jnp.arange(w))[None, :].astype(jnp.uint32)
  return lora.keep_bits(pairs, seed)[1 if upper else 0]


def _adapter_piece(a_ref, i: int, k: int, c0: int, w: int):
  """(w, r) rows [c0, c0 + w) of adapter i's A (a_ref: (n K, r))."""
  return plgpu.load(a_ref.at[(i * k + c0 + jnp.arange(w))[:, None], jnp.arange(a_ref.shape[-1])[None, :]])


def _vector_piece(ref, c0: int, w: int):
  return plgpu.load(ref.at[c0 + jnp.arange(w)]).astype(jnp.float32)


def _norm_down_kernel(*refs, k: int, n: int, bm: int, eps: float, has_delta: bool):
  # Inputs: x (rows, K)[, delta (rows, K)], LayerNorm scale and bias (K,), a (n K, r), the four per-adapter scalar
  # refs (n,). Outputs: [h (rows, K),] xh (rows, K + n r), mean and rstd (rows,).
  x_ref, refs = refs[0], refs[1:]
  d_ref, refs = (refs[0], refs[1:]) if has_delta else (None, refs)
  ln_scale_ref, ln_bias_ref, a_ref, seed_ref, cut_ref, factor_ref, scale_ref, *outs = refs
  h_ref, xh_ref, mean_ref, rstd_ref = outs if has_delta else (None, *outs)
  r, dtype = a_ref.shape[-1], xh_ref.dtype
  rows, pieces = _rows(bm), _row_pieces(k)
  hs = [plgpu.load(x_ref.at[_piece(rows, c0, w)]) for c0, _, w, _ in pieces]
  if has_delta:  # Rounded to the stream's dtype, as the add in XLA: the statistics are of the stored h.
    hs = [(v.astype(jnp.float32) + plgpu.load(d_ref.at[_piece(rows, c0, w)]).astype(jnp.float32)).astype(v.dtype)
          for v, (c0, _, w, _) in zip(hs, pieces)]
    for v, (c0, _, w, _) in zip(hs, pieces):
      plgpu.store(h_ref.at[_piece(rows, c0, w)], v)
  hf = [v.astype(jnp.float32) for v in hs]
  mean = sum(jnp.sum(v, axis=1) for v in hf) / k
  devs = [v - mean[:, None] for v in hf]
  rstd = jax.lax.rsqrt(sum(jnp.sum(d * d, axis=1) for d in devs) / k + eps)
  ys = []
  for dev, (c0, _, w, _) in zip(devs, pieces):
    y = (dev * rstd[:, None] * _vector_piece(ln_scale_ref, c0, w)[None, :]
         + _vector_piece(ln_bias_ref, c0, w)[None, :]).astype(dtype)
    plgpu.store(xh_ref.at[_piece(rows, c0, w)], y)
    ys.append(y)
  for i in range(n):  # h_i = scale_i * dropout_i(y) A_i, rounded as `down` rounds it.
    factor = factor_ref[i].astype(dtype)
    acc = None
    for y, (c0, off, w, upper) in zip(ys, pieces):
      bits = _piece_bits(rows, k // 2, off, w, upper, seed_ref[i])
      term = _dot(_masked(y, bits, cut_ref[i], factor), _adapter_piece(a_ref, i, k, c0, w))
      acc = term if acc is None else acc + term
    plgpu.store(xh_ref.at[_piece(rows, k + i * r, r)], acc.astype(dtype) * scale_ref[i].astype(dtype))
  plgpu.store(mean_ref.at[rows], mean)
  plgpu.store(rstd_ref.at[rows], rstd)


def _norm_up_grad_kernel(*refs, k: int, n: int, bm: int):
  # Inputs: n dxh_i (rows, K + r) = [dy_i W_i^T | dy_i B_i^T]; a (n K, r); the four scalar refs (n,); h (rows, K), the
  # LayerNorm's input; dstream (rows, K), h's cotangent from the stream's later uses; mean, rstd (rows,); the
  # LayerNorm's scale (K,). Output: dx (rows, K) = dstream + LN'(h)^T dy, dy = sum_i dx_i + dropout_i(dh_i A_i^T).
  dxh_refs, (a_ref, seed_ref, cut_ref, factor_ref, scale_ref, h_ref, dstream_ref, mean_ref, rstd_ref,
             ln_scale_ref, dx_ref) = refs[:n], refs[n:]
  r, dtype = a_ref.shape[-1], dx_ref.dtype
  rows, pieces = _rows(bm), _row_pieces(k)
  dys = [None] * len(pieces)
  for i in range(n):  # In `up_grad`'s order and dtype: the layer's dx, plus its adapter's masked dh A^T.
    dh = plgpu.load(dxh_refs[i].at[_piece(rows, k, r)]) * scale_ref[i].astype(dtype)
    factor = factor_ref[i].astype(dtype)
    for j, (c0, off, w, upper) in enumerate(pieces):
      back = _dot(dh, _adapter_piece(a_ref, i, k, c0, w), trans_b=True).astype(dtype)
      bits = _piece_bits(rows, k // 2, off, w, upper, seed_ref[i])
      d = plgpu.load(dxh_refs[i].at[_piece(rows, c0, w)]) + _masked(back, bits, cut_ref[i], factor)
      dys[j] = d if dys[j] is None else dys[j] + d
  mean = plgpu.load(mean_ref.at[rows])
  rstd = plgpu.load(rstd_ref.at[rows])
  xhats, gs = [], []
  for dy, (c0, _, w, _) in zip(dys, pieces):  # `pallas_norm`'s backward, piece by piece.
    h = plgpu.load(h_ref.at[_piece(rows, c0, w)]).astype(jnp.float32)
    xhats.append((h - mean[:, None]) * rstd[:, None])
    gs.append(dy.astype(jnp.float32) * _vector_piece(ln_scale_ref, c0, w)[None, :])
  m1 = sum(jnp.sum(g, axis=1) for g in gs) / k
  m2 = sum(jnp.sum(g * xhat, axis=1) for g, xhat in zip(gs, xhats)) / k
  for g, xhat, (c0, _, w, _) in zip(gs, xhats, pieces):
    dx = rstd[:, None] * (g - m1[:, None] - xhat * m2[:, None])
    dx = dx + plgpu.load(dstream_ref.at[_piece(rows, c0, w)]).astype(jnp.float32)
    plgpu.store(dx_ref.at[_piece(rows, c0, w)], dx.astype(dtype))


def _norm_check(rows: int, k: int, a_shape, what: str, block_rows: int):
  if len(a_shape) != 3 or a_shape[1] != k or not norm_supported(rows, k, a_shape[2], a_shape[0], block_rows):
    raise ValueError(f"LayerNorm + LoRA {what} kernel: input ({rows}, {k}), A {tuple(a_shape)} (n, K, r) outside "
                     "what the kernels take (pallas_lora.norm_supported)")


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_rows", "num_warps"))
def norm_down(x, delta, ln_scale, ln_bias, a, rates, seeds, scales, *, eps: float, interpret: bool = False,
              block_rows: int = NORM_BLOCK_ROWS, num_warps: int | None = None):
  """(h, xh, mean, rstd) for the stream x (rows, K) and delta (rows, K) or None: h = x + delta in x's dtype (None
  when delta is None), y = LayerNorm(h) (`pallas_norm.forward`'s math: fp32 statistics, y in x's dtype), xh = [y |
  h_1 | ... | h_n] as `down` makes it from y, mean and rstd (rows,) fp32."""
  if x.ndim != 2 or (delta is not None and delta.shape != x.shape):
    raise ValueError(f"LayerNorm + LoRA forward kernel: input {x.shape}, delta "
                     f"{None if delta is None else delta.shape}: expected (rows, K) and the same")
  rows, k = x.shape
  _norm_check(rows, k, a.shape, "forward", block_rows)
  n, _, r = a.shape
  has_delta = delta is not None
  stats = jax.ShapeDtypeStruct((rows,), jnp.float32)
  out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype)] if has_delta else []) + [
      jax.ShapeDtypeStruct((rows, k + n * r), x.dtype), stats, stats]
  outs = pl.pallas_call(
      functools.partial(_norm_down_kernel, k=k, n=n, bm=block_rows, eps=eps, has_delta=has_delta),
      grid=(rows // block_rows,), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps or _norm_warps(k, block_rows), num_stages=1),
      interpret=interpret, name="layer_norm_lora_down",
  )(x, *([delta.astype(x.dtype)] if has_delta else []), ln_scale, ln_bias, a.astype(x.dtype).reshape(n * k, r),
    *_scalars(rates, seeds, scales))
  return tuple(outs) if has_delta else (None, *outs)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "block_rows", "num_warps"))
def norm_up_grad(dxhs, a, rates, seeds, scales, h, dstream, mean, rstd, ln_scale, *, k: int,
                 interpret: bool = False, block_rows: int = NORM_BLOCK_ROWS, num_warps: int | None = None):
  """dx of the LayerNorm's input h (rows, K) whose output fed the n adapted layers that `norm_down` served: dstream
  (h's cotangent from its other uses) + LN'(h)^T dy for dy = sum_i dxh_i[:, :K] + dropout_i(scales[i] dxh_i[:, K:]
  a[i]^T) (`up_grad`'s dx, rounded as it rounds it), in h's dtype."""
  n, _, r = a.shape
  if len(dxhs) != n or len({tuple(d.shape) for d in dxhs}) != 1 or dxhs[0].shape != (h.shape[0], k + r) \
      or h.shape[1] != k or dstream.shape != h.shape:
    raise ValueError(f"LayerNorm + LoRA backward kernel: cotangents {[tuple(d.shape) for d in dxhs]}, h {h.shape}, "
                     f"dstream {dstream.shape} do not fit A {a.shape} (n arrays of (rows, K + r), K = {k})")
  rows = h.shape[0]
  _norm_check(rows, k, a.shape, "backward", block_rows)
  dtype = h.dtype
  return pl.pallas_call(
      functools.partial(_norm_up_grad_kernel, k=k, n=n, bm=block_rows),
      grid=(rows // block_rows,), out_shape=jax.ShapeDtypeStruct(h.shape, dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps or _norm_warps(k, block_rows), num_stages=1),
      interpret=interpret, name="layer_norm_lora_up_grad",
  )(*(d.astype(dtype) for d in dxhs), a.astype(dtype).reshape(n * k, r), *_scalars(rates, seeds, scales), h,
    dstream.astype(dtype), mean, rstd, ln_scale)

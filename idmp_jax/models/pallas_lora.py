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

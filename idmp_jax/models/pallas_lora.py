"""The LoRA adapter's input side with its dropout mask made in registers, as two Pallas (Triton) kernels: the GPU
implementation of `lora.adapted_matmul`'s forward and backward glue (which dispatches here on GPU).

`lora._lora_matmul` computes y = [x | h] @ [W; B] with h = scale * dropout(x) A (r extra columns). In XLA the
dropout(x) that feeds the rank-r GEMM is written out and read back (its Triton GEMM does not take the hash-mask
producer), [x | h] is a separate concatenation pass, and the backward recomputes dropout(x) for dA, writes
dh A^T at full width and masks it in yet another pass: on the SD-2 UNet's b32 step ~17 ms of such traffic
(BENCHMARKS.md). Here:

  forward   `concat_down(x, a, ...)` -> [x | scale * dropout(x) A]: one read of x, one write of the result.
  backward  `backward(xh, dxh, a, ...)` -> (dx, dA): dx = dxh[:, :k] + dropout(dh A^T), dA = dropout(x)^T dh with
            dh = scale * dxh[:, k:]; one read of x and of dxh, one write of dx, the mask computed once for both.

The mask is `lora._apply_dropout`'s (a hash of the element's index in the (rows, k) input and the seed, so the
kernels and the XLA path drop the same elements). One program takes `block_m` rows by `block_k` input columns;
the backward's programs each take a slice of the rows for one column block and write fp32 partial sums of dA,
added after.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from idmp_jax.models import lora

BLOCK_K = 64
ROW_SPLITS = 64  # Backward: programs along the rows per column block (each then adds dA over rows / 64 rows).


def block_m(rows: int) -> int:
  """The largest row block of (128, 64) dividing `rows` (0: none)."""
  return next((b for b in (128, 64) if rows % b == 0), 0)


def supported(rows: int, k: int, r: int) -> bool:
  """Shapes the kernels take: rows in whole 64- or 128-row blocks, k in whole 64-column blocks, a power-of-two
  rank in [16, 128] (the tensor-core dot's smallest side is 16), and element indices below 2^32 (the mask's
  counter)."""
  return bool(block_m(rows)) and k % BLOCK_K == 0 and 16 <= r <= 128 and not r & (r - 1) and rows * k < 2**32


def _keep(row0, col0, bm: int, bk: int, k: int, seed_ref, cut):
  """(bm, bk) bool: which elements of the tile at (row0, col0) of the (rows, k) input dropout keeps (the mask of
  `lora._apply_dropout`)."""
  rows = (row0 + jnp.arange(bm, dtype=jnp.int32)).astype(jnp.uint32)
  cols = (col0 + jnp.arange(bk, dtype=jnp.int32)).astype(jnp.uint32)
  return lora.dropout_keep(rows[:, None] * jnp.uint32(k) + cols[None, :], seed_ref[0], seed_ref[1], cut)


def _concat_down_kernel(x_ref, a_ref, seed_ref, cut_ref, factor_ref, scale_ref, xh_ref, *, k: int, bm: int):
  # x_ref: (bm, k) rows of x; a_ref: (k, r); xh_ref: (bm, k + r). Columns in blocks of BLOCK_K.
  row0 = pl.program_id(0) * bm
  cut, factor = cut_ref[0], factor_ref[0].astype(x_ref.dtype)

  def body(c, acc):
    col0 = pl.multiple_of(c * BLOCK_K, BLOCK_K)
    x = x_ref[:, pl.ds(col0, BLOCK_K)]
    xh_ref[:, pl.ds(col0, BLOCK_K)] = x
    xd = jnp.where(_keep(row0, col0, bm, BLOCK_K, k, seed_ref, cut), x * factor, jnp.zeros_like(x))
    return acc + plgpu.dot(xd, a_ref[pl.ds(col0, BLOCK_K), :])

  r = a_ref.shape[1]
  acc = jax.lax.fori_loop(0, k // BLOCK_K, body, jnp.zeros((bm, r), jnp.float32))
  # As XLA's path rounds: the product in the compute dtype, then the scale in it.
  xh_ref[:, pl.ds(k, r)] = acc.astype(xh_ref.dtype) * scale_ref[0].astype(xh_ref.dtype)


def _backward_kernel(xh_ref, dxh_ref, a_ref, seed_ref, cut_ref, factor_ref, scale_ref, dx_ref, da_ref, *, k: int,
                     bm: int, blocks: int):
  # Program (split, column block): rows [split * blocks * bm, ...) in `blocks` row blocks, columns
  # [col0, col0 + BLOCK_K). xh_ref, dxh_ref: (rows, k + r); dx_ref: (rows, k); da_ref: (BLOCK_K, r) partial sums.
  col0 = pl.multiple_of(pl.program_id(1) * BLOCK_K, BLOCK_K)
  first = pl.program_id(0) * blocks  # (Program ids outside the loop: the interpreter takes them only there.)
  r = a_ref.shape[1]
  cut, factor = cut_ref[0], factor_ref[0].astype(dx_ref.dtype)
  scale = scale_ref[0].astype(dx_ref.dtype)
  a = a_ref[pl.ds(col0, BLOCK_K), :]

  def body(i, acc):
    row0 = pl.multiple_of((first + i) * bm, bm)
    rows = pl.ds(row0, bm)
    keep = _keep(row0, col0, bm, BLOCK_K, k, seed_ref, cut)
    dh = dxh_ref[rows, pl.ds(k, r)] * scale  # (bm, r), as XLA's path: dh in the compute dtype.
    back = plgpu.dot(dh, a, trans_b=True).astype(dx_ref.dtype)  # dh A^T for these columns.
    dxd = jnp.where(keep, back * factor, jnp.zeros_like(back))
    dx_ref[rows, pl.ds(col0, BLOCK_K)] = (dxh_ref[rows, pl.ds(col0, BLOCK_K)] + dxd).astype(dx_ref.dtype)
    x = xh_ref[rows, pl.ds(col0, BLOCK_K)]
    xd = jnp.where(keep, x * factor, jnp.zeros_like(x))
    return acc + plgpu.dot(xd, dh, trans_a=True)

  da_ref[...] = jax.lax.fori_loop(0, blocks, body, jnp.zeros((BLOCK_K, r), jnp.float32))


def _scalars(rate, seed, scale):
  cut = jnp.round(rate.astype(jnp.float32) * 65536.0)
  factor = 65536.0 / (65536.0 - cut)
  return [seed.astype(jnp.uint32).reshape(2), cut.astype(jnp.int32).reshape(1), factor.reshape(1),
          scale.astype(jnp.float32).reshape(1)]


def _scalar_specs(grid_rank: int):
  index = (lambda i: (0,)) if grid_rank == 1 else (lambda i, j: (0,))
  return [pl.BlockSpec((2,), index)] + [pl.BlockSpec((1,), index)] * 3


def _check(x, a, what):
  rows, k = x.shape
  if a.ndim != 2 or a.shape[0] != k or not supported(rows, k, a.shape[1]):
    raise ValueError(f"LoRA {what} kernel: input {x.shape}, A {a.shape} outside what the kernels take "
                     f"(pallas_lora.supported)")


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages"))
def concat_down(x, a, rate, seed, scale, *, interpret: bool = False, num_warps: int = 4, num_stages: int = 3):
  """[x | scale * dropout(x) @ a] for x (rows, k) and a (k, r) in x's dtype; dropout as `lora._apply_dropout`
  with `rate` () and `seed` (2,) uint32."""
  _check(x, a, "forward")
  rows, k = x.shape
  r = a.shape[1]
  bm = block_m(rows)
  return pl.pallas_call(
      functools.partial(_concat_down_kernel, k=k, bm=bm),
      grid=(rows // bm,),
      in_specs=[pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((k, r), lambda i: (0, 0))]
      + _scalar_specs(1),
      out_specs=pl.BlockSpec((bm, k + r), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((rows, k + r), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="lora_concat_down",
  )(x, a.astype(x.dtype), *_scalars(rate, seed, scale))


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages"))
def backward(xh, dxh, a, rate, seed, scale, *, interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """(dx (rows, k) in xh's dtype, dA (k, r) fp32) for the forward `concat_down` ran: xh = [x | h] and dxh its
  cotangent's pre-image [dx_base | dh / scale] (rows, k + r)."""
  rows, width = xh.shape
  r = a.shape[1]
  k = width - r
  _check(xh[:, :k], a, "backward")
  if dxh.shape != xh.shape:
    raise ValueError(f"LoRA backward kernel: cotangent {dxh.shape} is not the forward's {xh.shape}")
  bm = block_m(rows)
  splits = min(ROW_SPLITS, rows // bm)
  while (rows // bm) % splits:
    splits -= 1
  blocks = rows // bm // splits
  full = lambda i, j: (0, 0)
  dx, da = pl.pallas_call(
      functools.partial(_backward_kernel, k=k, bm=bm, blocks=blocks),
      grid=(splits, k // BLOCK_K),
      in_specs=[pl.BlockSpec((rows, width), full), pl.BlockSpec((rows, width), full),
                pl.BlockSpec((k, r), full)] + _scalar_specs(2),
      out_specs=[pl.BlockSpec((rows, k), full), pl.BlockSpec((None, BLOCK_K, r), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((rows, k), xh.dtype), jax.ShapeDtypeStruct((splits, k, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="lora_backward",
  )(xh, dxh.astype(xh.dtype), a.astype(xh.dtype), *_scalars(rate, seed, scale))
  return dx, jnp.sum(da, axis=0)

"""int8-weight matrix-vector products for decoding (a few rows times a frozen int8 kernel) as one Pallas (Triton)
kernel: the GPU implementation of `quantize.matmul` for few rows (which dispatches here on GPU).

Why a kernel: at batch 4 the 7B decoder's step is its int8 weights streamed once (7 GB), and XLA's Triton GEMM
takes as long for them as for bf16 weights of twice the bytes (BENCHMARKS.md), which suggested its int8 -> bf16
convert (on the SM's quarter-rate conversion unit) bounds it. Here the convert can be the bit trick of
`pallas_convert` ("asm"), on full-rate units. Measured on an H200: level with XLA's GEMM on every decoder shape
whichever convert (BENCHMARKS.md), so the convert was not the bound; "auto" keeps XLA unless `CONFIGS` lists a
shape with a tiling measured faster.

Tiling: a program per (column block, K split); each streams its (K / splits, block_n) slab of the kernel in
(block_k, block_n) tiles, the rows padded to the 16 a tensor-core dot needs by masked loads. Several K splits
give enough programs for the H200's 132 SMs (4096 columns in blocks of 128 are only 32 programs); their fp32
partial sums are added after (a small reduction XLA fuses with the scale). `swap` computes W^T x^T instead of
x W, so that the wide operand is the dot's left one (M = block_n) and the padded rows its N = 16.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from idmp_jax.models import pallas_convert

ROWS = 16  # The tensor-core dot's smallest dimension: x's rows are padded to this many inside the kernel.


class Config(NamedTuple):
  block_n: int = 128
  block_k: int = 128
  splits: int = 4
  swap: bool = False
  convert: str = "asm"
  num_warps: int = 4
  num_stages: int = 4


# Tilings measured faster than XLA per (K, N) (benchmarks/int8_gemv_sweep.py --out, loaded by `set_configs`);
# None: XLA's GEMM measured faster for that shape. "auto" (quantize.matmul) runs the kernel only for shapes listed
# here with a tiling: on the H200 none is (the 7B decoder's shapes measured level with XLA, BENCHMARKS.md).
CONFIGS: dict[tuple[int, int], Config | None] = {}


def default_config(k: int, n: int) -> Config | None:
  return CONFIGS.get((k, n))


def set_configs(table: dict) -> None:
  """Overrides CONFIGS from a JSON-style table {"K,N": [Config fields] or null} (the sweep's --out)."""
  parsed = {}
  for key, fields in table.items():
    try:
      k, n = (int(d) for d in key.split(","))
      config = None if fields is None else Config(*fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"int8 gemv tiling table: entry {key!r}: {fields!r} is not \"K,N\": [{', '.join(Config._fields)}]"
                       f" or null ({e})") from None
    if config is not None:
      pallas_convert.resolve(config.convert, False, f"int8 gemv tiling table: entry {key!r}")
    parsed[(k, n)] = config
  CONFIGS.update(parsed)  # Only once every entry parsed: a bad table changes nothing.


def supported(rows: int, k: int, n: int, config: Config | None = None) -> bool:
  """Whether the kernel takes (rows, K) x (K, N) with `config` (default: the shape's measured tiling; False
  where that is XLA's)."""
  c = config or default_config(k, n)
  return c is not None and 0 < rows <= ROWS and n % c.block_n == 0 and k % c.block_k == 0


def _gemv_kernel(x_ref, w_ref, s_ref, o_ref, *, rows: int, block_k: int, steps: int, splits: int, c: Config):
  # x_ref: (ROWS, K) over x's (rows, K); w_ref: (K, block_n) int8; s_ref: (block_n,) fp32; o_ref: (ROWS, block_n),
  # fp32 partial sums of this program's K split (splits > 1) or the scaled output in x's dtype.
  split = pl.program_id(1)
  lo, hi = split * steps // splits, (split + 1) * steps // splits
  real = (jnp.arange(ROWS) < rows)[:, None]

  def body(i, acc):
    k = pl.multiple_of(i * block_k, block_k)
    x = plgpu.load(x_ref.at[:, pl.ds(k, block_k)], mask=real, other=0.0)
    w = plgpu.load(w_ref.at[pl.ds(k, block_k), :], eviction_policy="evict_first")  # Read once: keep L2 for x.
    w = pallas_convert.int8_to(w, x.dtype, c.convert)
    if c.swap:
      return acc + plgpu.dot(w, x, trans_a=True, trans_b=True)
    return acc + plgpu.dot(x, w)

  shape = (o_ref.shape[-1], ROWS) if c.swap else (ROWS, o_ref.shape[-1])
  acc = jax.lax.fori_loop(lo, hi, body, jnp.zeros(shape, jnp.float32))
  if c.swap:
    acc = acc.T
  if splits == 1:
    acc = (acc * s_ref[...][None, :]).astype(o_ref.dtype)
  plgpu.store(o_ref, acc, mask=real)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gemv(x, q, scale, *, config: Config | None = None, interpret: bool = False):
  """(x @ q) * scale in x's dtype: x (..., K) with at most ROWS rows in all, q (K, N) int8, scale (N,) fp32 (the
  per-column int8 format of `quantize.quantize_int8`). `interpret`: run the kernel on any backend (the tests)."""
  k, n = q.shape
  if x.shape[-1] != k or scale.shape != (n,) or q.dtype != jnp.int8:
    raise ValueError(f"int8 gemv: x {x.shape}, kernel {q.shape} {q.dtype}, scale {scale.shape} do not match")
  c = config or default_config(k, n) or Config()
  c = c._replace(convert=pallas_convert.resolve(c.convert, interpret, "int8 gemv"))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  rows = x2.shape[0]
  if not supported(rows, k, n, c):
    raise ValueError(f"int8 gemv: {rows} rows x kernel {q.shape} outside what config {c} tiles")
  steps = k // c.block_k
  splits = max(1, min(c.splits, steps))
  if splits == 1:
    out_spec = pl.BlockSpec((ROWS, c.block_n), lambda j, s: (0, j))
    out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
  else:
    out_spec = pl.BlockSpec((None, ROWS, c.block_n), lambda j, s: (s, 0, j))
    out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
  out = pl.pallas_call(
      functools.partial(_gemv_kernel, rows=rows, block_k=c.block_k, steps=steps, splits=splits, c=c),
      grid=(n // c.block_n, splits),
      in_specs=[pl.BlockSpec((ROWS, k), lambda j, s: (0, 0)),
                pl.BlockSpec((k, c.block_n), lambda j, s: (0, j)),
                pl.BlockSpec((c.block_n,), lambda j, s: (j,))],
      out_specs=out_spec, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
      interpret=interpret, name="int8_gemv",
  )(x2, q, scale.astype(jnp.float32))
  if splits > 1:
    out = (jnp.sum(out, axis=0) * scale.astype(jnp.float32)).astype(x.dtype)
  return out.reshape(*lead, n)

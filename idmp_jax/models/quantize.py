"""int8 and int4 for frozen Linear kernels (param-tree transforms, like LoRA: `idmp_jax.models.lora`) and int8 for
the KV cache.

`quantize_int8(params, predicate)` replaces each selected 2-D `kernel` (in, out) by

  kernel        (out, in) int8      round(W.T / s), symmetric, in [-127, 127]
  kernel_scale  (out,)    fp32      s = max_i |W[i, o]| / 127 (per output channel; 1 for an all-zero channel)

and `idmp_jax.models.layers.Linear` dequantises in the matmul when it finds `kernel_scale` (`matmul`):
y = (x @ kernel.T.astype(dtype)) * s, which equals x @ (W~ * s) because s scales whole output columns. So the
base model is unchanged, its frozen weights take half the memory of bf16, and a LoRA adapter beside the kernel
still works (its leaves stay fp32). The error per weight is at most s / 2 (half a step of its channel's grid).

Why (out, in), as torch's Linear stores its weight, unlike the float kernels' (in, out): the contraction axis
is then contiguous, and XLA's GPU GEMM over int8 weights at decode shapes reads it faster: at 4 rows 4-20% per
matmul on the 7B's shapes, 2.83 -> 2.37 ms of GEMMs a batch-4 decode step (H200; benchmarks/int8_matmul_sweep.py,
BENCHMARKS.md). The rule is by dtype: an int8 kernel is (out, in)
(`kernel_in_out` gives its logical shape); float and int4 kernels are (in, out).

`quantize_int4(params, predicate, group_size)` is the 4-bit analogue, with one scale per `group_size` rows of
each output column (kernel (in, out) int4 in [-7, 7], kernel_scale (in / group_size, out) fp32), as 4-bit
schemes need to stay accurate (the original's NF4 uses blocks of 64). A quarter of bf16's weight bytes: the
memory option (the 7B's language model in ~4 GB). Not a speed option on the GPU: XLA's int4 GEMMs at decode
shapes run at best at int8's speed, not faster (benchmarks/int4_matmul_sweep.py, BENCHMARKS.md); `matmul` uses
the fastest form measured for few rows (a dot per group, scales on the partial sums).

Why not the original's NF4 (bitsandbytes): NF4 needs a lookup-table dequantise and packed nibbles, which XLA
would run as separate unfused ops; symmetric integer grids are a convert and a multiply.

The KV cache (`idmp_jax.models.llama.init_cache(..., dtype=jnp.int8)`) uses the same symmetric scheme per cached
vector: each (row, head, slot) key or value of head_dim numbers is stored as int8 with one fp32 scale
(`quantize_vectors`). A decode step then reads half the cache bytes, which at long prompts is a third of what it
reads in all (vicuna-7b, 3064 tokens, batch 4: 6.4 of 19.9 GB). Lossy, like int8 weights: opt-in.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SCALE = "kernel_scale"


def _symmetric(x, axis: int, xp, qmax: int = 127, qtype=np.int8):
  """The one scheme: (q, fp32 scale) with scale = max |x| / qmax along `axis` (1 where all zero) and
  q = round(x / scale) in [-qmax, qmax], stored as `qtype`. `xp` is numpy (host, the 7B weights) or jax.numpy
  (traced, the cache)."""
  xf = xp.asarray(x, xp.float32)
  amax = xp.max(xp.abs(xf), axis=axis)
  scale = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
  q = xp.clip(xp.round(xf / xp.expand_dims(scale, axis)), -qmax, qmax).astype(qtype)
  return q, scale


def quantize_kernel(kernel, bits: int = 8, group_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(in, out) float -> (quantised kernel in its stored layout, fp32 scale), symmetric, on the host: int8 (out, in)
  with a scale (out,) per output channel; int4 (in, out) with group_size (in / group_size, out) scales, one per
  group_size consecutive rows of each column (or (out,) per channel without group_size)."""
  qmax, qtype = {8: (127, np.int8), 4: (7, jnp.int4)}[bits]
  kernel = np.asarray(kernel)
  if bits == 8:
    if group_size:
      raise ValueError("quantize: int8 kernels take one scale per output channel, not groups")
    return _symmetric(np.ascontiguousarray(kernel.T), 1, np, qmax, qtype)
  if not group_size:
    return _symmetric(kernel, 0, np, qmax, qtype)
  k, n = kernel.shape
  if k % group_size:
    raise ValueError(f"quantize: {k} input rows are not divisible into groups of {group_size}")
  q, scale = _symmetric(kernel.reshape(k // group_size, group_size, n), 1, np, qmax, qtype)
  return q.reshape(k, n), scale


WEIGHT_FORMATS = ("", "int8", "int4")  # What the tasks' `quantize` options take ("" = the compute dtype).


def check_format(fmt: str, field: str) -> None:
  """A config field's weight format, named when it is not one of WEIGHT_FORMATS (before anything loads)."""
  if fmt not in WEIGHT_FORMATS:
    raise ValueError(f"{field} = {fmt!r}: expected one of {WEIGHT_FORMATS}")


def _grouped_weight(q, scale, dtype):
  """A grouped (int4) kernel dequantised as (groups, rows per group, out): the converted kernel times a plain
  broadcast of its scales."""
  groups, (k, n) = scale.shape[0], q.shape
  return q.reshape(groups, k // groups, n).astype(dtype) * scale.astype(dtype)[:, None, :]


def kernel_in_out(kernel) -> tuple[int, int]:
  """(in, out) of a Linear kernel in any stored form (int8 kernels are stored (out, in))."""
  rows, cols = kernel.shape
  return (cols, rows) if kernel.dtype == jnp.int8 else (rows, cols)


def dequantize_kernel(q, scale, dtype=jnp.float32):
  """The (in, out) kernel in `dtype` from a stored int8 or int4 one."""
  if q.dtype == jnp.int8:
    return (q.astype(dtype) * scale.astype(dtype)[:, None]).T
  if scale.ndim == 1:
    return q.astype(dtype) * scale.astype(dtype)
  return _grouped_weight(q, scale, dtype).reshape(q.shape)


def matmul(x, q, scale, dtype):
  """(x @ dequantised kernel) in `dtype`: int8 (out, in), contracted over its contiguous axis, with the per-channel
  scale after the dot; int4 (in, out) grouped, one dot per group with the scales applied to its partial sums (few
  rows: decode) or to the converted kernel (many rows)."""
  x = x.astype(dtype)
  rows = math.prod(x.shape[:-1])
  if q.dtype == jnp.int8:
    y = jax.lax.dot_general(x, q.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())))
    return y * scale.astype(dtype)
  if scale.ndim == 1:
    return jnp.dot(x, q.astype(dtype)) * scale.astype(dtype)
  groups, (k, n) = scale.shape[0], q.shape
  xg = x.reshape(*x.shape[:-1], groups, k // groups)
  if rows * groups <= k:  # The (rows, groups, n) partials in `dtype` are no larger than the converted kernel.
    # XLA fuses the int4 convert into the batched dot only while no scale multiplies the kernel: a scaled kernel
    # is written out dequantised each call (2.4x slower than int8 at batch 4, BENCHMARKS.md).
    parts = jnp.einsum("...gr,grn->...gn", xg, q.reshape(groups, k // groups, n).astype(dtype))
    return jnp.einsum("...gn,gn->...n", parts.astype(jnp.float32), scale).astype(dtype)
  # Contracting over (group, row in group) keeps the scales a plain broadcast of the converted kernel: one
  # dequantised copy per call, then one GEMM (prefill and training rows amortise it).
  return jnp.einsum("...gr,grn->...n", xg, _grouped_weight(q, scale, dtype))


def quantize_weights(params, fmt: str, predicate: Callable[[tuple], bool]) -> dict:
  """`fmt` of WEIGHT_FORMATS applied to the kernels `predicate` selects ("" returns params unchanged)."""
  check_format(fmt, "quantize")
  return {"": lambda: params, "int8": lambda: quantize_int8(params, predicate),
          "int4": lambda: quantize_int4(params, predicate)}[fmt]()


def quantize_vectors(x):
  """(..., d) float -> (int8 (..., d), fp32 scale (...)): symmetric over the last axis (traceable)."""
  return _symmetric(x, -1, jnp)


def dequantize_vectors(q, scale, dtype):
  return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def quantize_int8(params, predicate: Callable[[tuple], bool]) -> dict:
  """Quantises every 2-D `kernel` whose module path (the path without the leaf) satisfies `predicate`."""
  return _quantize_tree(params, predicate, quantize_kernel)


INT4_GROUP = 64  # Rows per int4 scale: the original's NF4 block size.


def quantize_int4(params, predicate: Callable[[tuple], bool], group_size: int = INT4_GROUP) -> dict:
  """As `quantize_int8`, to int4 with one scale per `group_size` input rows of each output column (a kernel with
  fewer rows is one group: the tiny test models)."""
  if group_size <= 0:
    raise ValueError(f"quantize_int4: group_size must be positive, got {group_size}")
  return _quantize_tree(params, predicate, lambda w: quantize_kernel(w, 4, min(group_size, np.shape(w)[0])))


def _quantize_tree(params, predicate, quantize_fn) -> dict:
  flat = traverse_util.flatten_dict(params)
  out = dict(flat)
  for path, value in flat.items():
    if path[-1] == "kernel" and np.ndim(value) == 2 and predicate(path[:-1]):
      if path[:-1] + (SCALE,) in flat:
        raise ValueError(f"{'/'.join(path)} is already quantised")
      out[path], out[path[:-1] + (SCALE,)] = quantize_fn(value)
  return traverse_util.unflatten_dict(out)


def dequantize(params) -> dict:
  """The float tree back (fp32 kernels) from a tree `quantize_int8` or `quantize_int4` made."""
  flat = traverse_util.flatten_dict(params)
  out = {p: v for p, v in flat.items() if p[-1] != SCALE}
  for path, scale in flat.items():
    if path[-1] == SCALE:
      out[path[:-1] + ("kernel",)] = np.asarray(dequantize_kernel(flat[path[:-1] + ("kernel",)], scale))
  return traverse_util.unflatten_dict(out)

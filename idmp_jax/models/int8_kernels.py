"""Decode-time GPU kernels for int8 weights and an int8 KV cache (`idmp_jax.models.quantize`), in Pallas (Triton).

At batch 4 a decode step of the 7B decoder is a chain of matrix-vector products and single-query attentions
whose cost is reading the int8 weights (7 GB) and the int8 cache (3.3 GB at 3k tokens). XLA runs the int8
products as Triton GEMM fusions tuned for matrices and the cache reads as generic reductions; both read at
~2.4 TB/s on an H200 (BENCHMARKS.md, decode profile), half of the chip's bandwidth. The kernels here stream
each byte once, in tiles Triton pipelines:

  gemv              y = (x @ q) * scale for at most 16 rows x: a program per column block of q, top to bottom
                    over K; x's rows padded to the 16 a tensor-core dot needs by masked loads; the convert and
                    the per-column scale inside; written once in the compute dtype; no split over K, so no
                    second kernel for partial sums.
  decode_attention  one query per (row, kv head) over the int8 cache, online softmax over key tiles, scales
                    applied per key and per value as `attention.decode_attention_int8` does.

`mode()` says whether models use them: "off" (XLA everywhere), "auto" (on GPU, for shapes the kernels take), or
"interpret" (the same kernels interpreted on any backend: how the tests run them on the CPU). Set it with
`set_mode` or the IDMP_INT8_KERNELS environment variable; the choice is read when a function is traced.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 16  # The tensor-core dot's smallest M: x is padded to this many rows inside the kernel.
MODES = ("off", "auto", "interpret")
_mode = [os.environ.get("IDMP_INT8_KERNELS", "off")]
_attention_splits = [1]


def set_mode(mode: str, attention_splits: int = 1) -> None:
  """mode: see the module docstring; attention_splits: key splits per (row, kv head) in `decode_attention`."""
  if mode not in MODES:
    raise ValueError(f"int8 kernels mode {mode!r}: expected one of {MODES}")
  if attention_splits < 1:
    raise ValueError(f"int8 kernels: attention_splits must be >= 1, got {attention_splits}")
  _mode[0], _attention_splits[0] = mode, attention_splits


def mode() -> str:
  if _mode[0] not in MODES:
    raise ValueError(f"IDMP_INT8_KERNELS={_mode[0]!r}: expected one of {MODES}")
  return _mode[0]


def attention_splits() -> int:
  return _attention_splits[0]


def enabled() -> tuple[bool, bool]:
  """(use the kernels, interpret them) for the function being traced now."""
  m = mode()
  return (m == "interpret" or (m == "auto" and jax.default_backend() == "gpu")), m == "interpret"


def _pick(n: int, choices) -> int | None:
  return next((c for c in choices if n % c == 0), None)


# Tile choices measured on the GPU (benchmarks/int8_kernels_sweep.py) override the heuristics below:
# {"gemv": {"K,N": [style, block_n, block_k, num_warps, num_stages]}, "attention": [splits, block_s, warps, stages]}.
_tuning = {"gemv": {}, "attention": None}


def set_tuning(table: dict) -> None:
  _tuning["gemv"] = {tuple(int(d) for d in key.split(",")): tuple(v) for key, v in table.get("gemv", {}).items()}
  _tuning["attention"] = tuple(table["attention"]) if table.get("attention") else None


if os.environ.get("IDMP_INT8_KERNELS_TUNING"):
  import json
  with open(os.environ["IDMP_INT8_KERNELS_TUNING"]) as _f:
    set_tuning(json.load(_f))


def gemv_config(k: int, n: int, rows: int) -> tuple | None:
  """(style, block_n, block_k, num_warps, num_stages) for a (k, n) kernel, or None when no tiling fits (the
  caller then uses XLA). Heuristic: a tensor-core dot per (16-row, K tile) step, the widest column block that
  still gives ~128+ programs (one per SM), weight tiles of at most 16 KiB."""
  if (k, n) in _tuning["gemv"]:
    cfg = _tuning["gemv"][(k, n)]
    if cfg[0] == "xla":  # Measured: XLA's own GEMM is faster for this shape.
      return None
    if cfg[0] == "dot" or rows <= FMA_MAX_ROWS:
      return cfg
  block_n = next((b for b in (64, 32, 16) if n % b == 0 and n // b >= 128), _pick(n, (16,)))
  if block_n is None:
    return None
  block_k = _pick(k, tuple(c for c in (512, 256, 128, 64, 32, 16) if c * block_n <= 16384))
  return None if block_k is None else ("dot", block_n, block_k, 4, 4)


FMA_MAX_ROWS = 8  # The "fma" style keeps a (block_k, block_n) fp32 accumulator per row in registers.


def supported(x_shape, kernel_shape) -> bool:
  rows = 1
  for d in x_shape[:-1]:
    rows *= d
  return rows <= MAX_ROWS and gemv_config(*kernel_shape, rows) is not None


def _dot_kernel(x_ref, w_ref, s_ref, o_ref, *, rows: int, block_k: int, steps: int):
  # x_ref: (MAX_ROWS, K) over x's (rows, K); w_ref: (K, block_n); s_ref: (block_n,); o_ref: (MAX_ROWS, block_n).
  real = (jnp.arange(MAX_ROWS) < rows)[:, None]

  def body(i, acc):
    k = pl.multiple_of(i * block_k, block_k)
    x = plgpu.load(x_ref.at[:, pl.ds(k, block_k)], mask=real, other=0.0)
    w = plgpu.load(w_ref.at[pl.ds(k, block_k), :], eviction_policy="evict_first")  # read once: keep L2 for x
    return acc + plgpu.dot(x, w.astype(x.dtype))

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((MAX_ROWS, o_ref.shape[-1]), jnp.float32))
  y = acc * s_ref[...].astype(jnp.float32)[None, :]
  plgpu.store(o_ref, y.astype(o_ref.dtype), mask=real)


def _fma_kernel(x_ref, w_ref, s_ref, o_ref, *, rows: int, block_k: int, steps: int):
  # No tensor cores: each row keeps a (block_k, block_n) fp32 product sum, reduced over K once at the end, so
  # the loop body is loads, converts and FMAs only (x_ref: (MAX_ROWS, K) over (rows, K)).
  def body(i, accs):
    k = pl.multiple_of(i * block_k, block_k)
    w = plgpu.load(w_ref.at[pl.ds(k, block_k), :], eviction_policy="evict_first").astype(jnp.float32)
    return [acc + x_ref[r, pl.ds(k, block_k)].astype(jnp.float32)[:, None] * w for r, acc in enumerate(accs)]

  shape = (block_k, o_ref.shape[-1])
  accs = jax.lax.fori_loop(0, steps, body, [jnp.zeros(shape, jnp.float32) for _ in range(rows)])
  s = s_ref[...].astype(jnp.float32)
  for r, acc in enumerate(accs):
    o_ref[r, :] = (jnp.sum(acc, axis=0) * s).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gemv(x, q, scale, *, config: tuple | None = None, interpret: bool = False):
  """(x @ q) * scale in x's dtype: x (..., K) with at most MAX_ROWS rows in all, q (K, N) int8, scale (N,).
  config: (style "dot" | "fma", block_n, block_k, num_warps, num_stages); default `gemv_config`'s."""
  k, n = q.shape
  if x.shape[-1] != k or scale.shape != (n,) or q.dtype != jnp.int8:
    raise ValueError(f"int8 gemv: x {x.shape}, kernel {q.shape} {q.dtype}, scale {scale.shape} do not match")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  rows = x2.shape[0]
  config = config or (gemv_config(k, n, rows) if rows <= MAX_ROWS else None)
  if config is None:
    raise ValueError(f"int8 gemv: x {x.shape} with kernel {q.shape} is outside what the kernel tiles")
  style, block_n, block_k, num_warps, num_stages = config
  if n % block_n or k % block_k or (style == "fma" and rows > FMA_MAX_ROWS):
    raise ValueError(f"int8 gemv: config {config} does not tile kernel {q.shape} for {rows} rows")
  body = {"dot": _dot_kernel, "fma": _fma_kernel}[style]
  out = pl.pallas_call(
      functools.partial(body, rows=rows, block_k=block_k, steps=k // block_k),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((MAX_ROWS, k), lambda j: (0, 0)),
                pl.BlockSpec((k, block_n), lambda j: (0, j)),
                pl.BlockSpec((block_n,), lambda j: (j,))],
      out_specs=pl.BlockSpec((MAX_ROWS, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"int8_gemv_{style}",
  )(x2, q, scale)
  return out.reshape(*lead, n)


# ----------------------------------------------------------------------------------------------------------------
# Decode attention over an int8 KV cache.


def _attention_kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, valid_ref, *out_refs, groups: int, length: int,
                      block_s: int, chunk: int, scale: float):
  # One (row, kv head, split) per program. q_ref: (G, H) the queries of this kv head; k_ref, v_ref: (S, H) int8;
  # ks_ref, vs_ref: (S,) fp32 scales; valid_ref: (S,) int32 (1 = may attend). One split: out_refs = (o,) (G, H)
  # in the output dtype, normalised. Several: (acc (G, H), m (G,), l (G,)) in fp32, merged by the caller.
  lo = pl.program_id(2) * chunk
  hi = jnp.minimum(lo + chunk, length)
  qs = [q_ref[g, :].astype(jnp.float32) * scale for g in range(groups)]
  neg = jnp.float32(-1e30)

  def body(t, carry):
    nominal = lo + t * block_s
    start = jnp.minimum(nominal, length - block_s)  # The last tile slides back (never out of bounds) ...
    idx = start + jnp.arange(block_s)
    use = (idx >= nominal) & (idx < hi) & (valid_ref[pl.ds(start, block_s)] != 0)  # ... and skips what is done.
    k = k_ref[pl.ds(start, block_s), :].astype(jnp.float32)
    v = v_ref[pl.ds(start, block_s), :].astype(jnp.float32)
    ks, vs = ks_ref[pl.ds(start, block_s)], vs_ref[pl.ds(start, block_s)]
    out = []
    for g, (acc, m, l) in enumerate(carry):
      logits = jnp.where(use, jnp.sum(k * qs[g][None, :], axis=1) * ks, neg)
      m_new = jnp.maximum(m, jnp.max(logits))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(use, jnp.exp(logits - m_new), 0.0)
      acc = acc * alpha + jnp.sum((p * vs)[:, None] * v, axis=0)
      out.append((acc, m_new, l * alpha + jnp.sum(p)))
    return out

  h = k_ref.shape[-1]
  init = [(jnp.zeros((h,), jnp.float32), neg, jnp.float32(0.0)) for _ in range(groups)]
  carry = jax.lax.fori_loop(0, pl.cdiv(hi - lo, block_s), body, init)
  for g, (acc, m, l) in enumerate(carry):
    if len(out_refs) == 1:
      out_refs[0][g, :] = (acc / l).astype(out_refs[0].dtype)
    else:
      out_refs[0][g, :] = acc
      out_refs[1][g] = m
      out_refs[2][g] = l


def _block_s(length: int) -> int:
  return min(256, 1 << (max(length, 1).bit_length() - 1))  # A power of two, at most the cache length.


def attention_supported(q_shape, k_shape) -> bool:
  _, t, n, h = q_shape
  nk, s = k_shape[1], k_shape[2]
  return t == 1 and n % nk == 0 and n // nk <= 8 and s >= 16 and h >= 16 and not h & (h - 1)


def attention_config() -> tuple | None:
  """(splits, block_s, num_warps, num_stages) for `decode_attention`: the measured table's (None where it says
  XLA's is faster), else set_mode's splits with 256-key tiles."""
  if _tuning["attention"] and _tuning["attention"][0] == "xla":
    return None
  return _tuning["attention"] or (attention_splits(), 256, 4, 2)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention(q, k, v, k_scale, v_scale, valid, *, scale: float, config: tuple = (1, 256, 4, 2),
                     interpret: bool = False):
  """softmax(q k^T * scale, where valid) v over an int8 cache, the scales applied per key and per value as
  `attention.decode_attention_int8` does. q: (B, 1, N, H); k, v: (B, Nk, S, H) int8; k_scale, v_scale:
  (B, Nk, S) fp32; valid: (B, S) bool (each row must have a valid slot). Returns (B, 1, N, H) in q's dtype.
  config: (splits, block_s, num_warps, num_stages); splits > 1 divides each row's keys among that many programs
  (more programs for small batches; their partial softmaxes are merged here). Models pass `attention_config()`."""
  splits, block_s, num_warps, num_stages = config
  b, _, n, h = q.shape
  nk, s = k.shape[1], k.shape[2]
  groups = n // nk
  block_s = min(block_s, _block_s(s))
  if not attention_supported(q.shape, k.shape):
    raise ValueError(f"int8 decode attention: q {q.shape}, cache {k.shape} outside what the kernel takes")
  chunk = pl.cdiv(pl.cdiv(s, splits), block_s) * block_s
  splits = pl.cdiv(s, chunk)
  qg = q.reshape(b, nk, groups, h)
  kv_spec = pl.BlockSpec((None, None, s, h), lambda i, j, c: (i, j, 0, 0))
  sc_spec = pl.BlockSpec((None, None, s), lambda i, j, c: (i, j, 0))
  in_specs = [pl.BlockSpec((None, None, groups, h), lambda i, j, c: (i, j, 0, 0)), kv_spec, kv_spec, sc_spec,
              sc_spec, pl.BlockSpec((None, s), lambda i, j, c: (i, 0))]
  if splits == 1:
    out_specs = [pl.BlockSpec((None, None, groups, h), lambda i, j, c: (i, j, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, nk, groups, h), q.dtype)]
  else:
    out_specs = [pl.BlockSpec((None, None, None, groups, h), lambda i, j, c: (i, j, c, 0, 0)),
                 pl.BlockSpec((None, None, None, groups), lambda i, j, c: (i, j, c, 0)),
                 pl.BlockSpec((None, None, None, groups), lambda i, j, c: (i, j, c, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, nk, splits, groups, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, splits, groups), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, splits, groups), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_attention_kernel, groups=groups, length=s, block_s=block_s, chunk=chunk, scale=scale),
      grid=(b, nk, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="int8_decode_attention",
  )(qg, k, v, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32), valid.astype(jnp.int32))
  if splits == 1:
    out = outs[0]
  else:
    acc, m, l = outs
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    out = (jnp.sum(acc * w[..., None], axis=2) / jnp.sum(l * w, axis=2)[..., None]).astype(q.dtype)
  return out.reshape(b, 1, n, h)

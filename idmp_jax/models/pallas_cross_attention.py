"""Attention over few keys (S <= 128: the UNet's cross-attention over 77 text tokens, padded to 78) with RCA's
boolean mask, forward and backward, as Pallas (Triton) kernels: the GPU alternative to cuDNN's flash attention
for these calls.

cuDNN's kernels tile long key sequences; on 78 keys they run at ~5x the memory floor (H200, b32, T=4096, 5 heads
of 64: 256 us forward, 850 us forward + backward, where reading q and writing o takes ~55 us). Here all of a
head's keys fit in registers, so one program holds its (batch, head)'s k and v and loops over a span of query
tiles; the softmax is computed whole (no online rescaling), and the backward recomputes it from q and k rather
than saving anything: no log-sum-exp, and no output read back (D = rowsum(P * dP) from the recomputed P and dP,
not rowsum(dO * O)). The HBM traffic is then about q + mask + o forward and q + dO + mask + dQ backward, plus fp32
partial dK/dV per query span (`splits`), summed by XLA. The keys are split into power-of-two tiles (78 -> 64 + 16,
`_key_tiles`) rather than padded to 128: per key, the softmax's elementwise work (the exp on the quarter-rate
unit above all) is of the order of the memory time, so padding keys are not free.

Grid (heads, splits, batch): the head varies fastest, so the programs reading one mask tile (it is shared by all
heads) run together and the mask comes from HBM about once. The mask is the caller's bool array (one byte per
element; Pallas loads i1 through an i8 pointer) padded with False to the key tiles' width (78 -> 80 columns, in
XLA, once per mask: identical pads of one mask are merged): rows of 78 bytes are not 16-byte aligned, so every tile
load was split into byte loads, and the mask cost the kernels more than q (H200, 64x64 level: forward + backward
557 us with the mask against 372 without).

Semantics are `attention.dot_product_attention(..., implementation="xla")`'s: fp32 logits and softmax, masked
logits at float32's min (so a query whose keys are all masked averages all S real keys; its q gets no gradient),
the probabilities cast to v's dtype before P @ V. Padding keys are -inf: probability exactly 0 in every row.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# (fwd block_t, fwd splits, fwd num_warps, fwd num_stages, bwd block_t, bwd splits, bwd num_warps, bwd num_stages).
# block_t: queries per tile (a power of two >= 16; lowered to the largest power of two dividing T). splits: query
# spans per (batch, head), each one program looping over its tiles; 0 = enough for FORWARD_PROGRAMS /
# BACKWARD_PROGRAMS programs. Measured on an H200 at b32 (benchmarks/attention_probe.py, BENCHMARKS.md), RCA mask,
# 64x64 latents: forward 64-query tiles 124-151 us against 181 for 128 (cuDNN 293); forward + backward with
# 128-query backward tiles 557 us against 811 for 64 (cuDNN 883), 438 with the mask padded; at 32x32, 272 (cuDNN
# 432). Backward splits (padded mask, forward + backward): 64x64 2 -> 4 splits 438 -> 425 us, 8 splits with 4
# warps 577; 32x32 1 -> 4 splits 272 -> 258; 16x16 1 -> 2 splits 165 -> 272. Hence 512 programs: 4, 2 and 1.
DEFAULT_CONFIG = (64, 0, 4, 2, 128, 0, 8, 2)
FORWARD_PROGRAMS = 1024  # Enough to fill an H200 (132 SMs) several times; k/v are read once per program.
BACKWARD_PROGRAMS = 512  # Fewer: each split writes its own fp32 dK/dV partial, read back by XLA's sum.
MAX_KEYS = 128
MASKED = float(jnp.finfo(jnp.float32).min)  # XLA's masked logit.
LOG2E = 1.4426950408889634


def supported(q_shape, k_shape) -> bool:
  """Shapes the kernels take: q (B, T, N, H) and k (B, S, N, H) with S <= 128 keys, a power-of-two head size in
  [16, 128] (Triton's dots need dimensions >= 16) and T a multiple of 16 (query tiles are powers of two >= 16 that
  divide T)."""
  if len(q_shape) != 4 or len(k_shape) != 4:
    return False
  b, t, n, h = q_shape
  s = k_shape[1]
  return (k_shape[0] == b and tuple(k_shape[2:]) == (n, h) and 1 <= s <= MAX_KEYS and 16 <= h <= 128
          and not h & (h - 1) and t > 0 and t % 16 == 0)


def _key_tiles(s: int) -> tuple[tuple[int, int], ...]:
  """(start, size) of the key tiles: powers of two >= 16 (Triton's shapes, and its dots' minimum) covering S
  rounded up to 16, largest first: 78 keys -> 64 + 16, not 128 (the elementwise softmax work, per key, is what
  the kernels spend their instructions on)."""
  total, tiles, start = -(-s // 16) * 16, [], 0
  for size in (128, 64, 32, 16):
    if total & size:
      tiles.append((start, size))
      start += size
  return tuple(tiles)


def _tiling(block_t: int, splits: int, t: int, pairs: int, programs: int) -> tuple[int, int]:
  """(block_t, splits) for T queries and `pairs` (batch, head) pairs: the tile lowered to the largest power of two
  dividing T; splits divide the tiles evenly (0: doubled while there are fewer than `programs` programs)."""
  block_t = min(block_t, t & -t)
  tiles = t // block_t
  if splits:
    return block_t, math.gcd(splits, tiles)
  splits = 1
  while pairs * splits < programs and tiles % (2 * splits) == 0:
    splits *= 2
  return block_t, splits


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """a @ b (either transposed) with fp32 accumulation; fp32 operands as fp32 (IEEE, not TF32: the parity path)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _load_keys(ref, tiles, s_len: int):
  """A head's keys or values, one (size, H) array per key tile; rows past the S real ones (another head's or
  batch's memory, or the interpreter's NaN padding) read as 0."""
  out = []
  for start, size in tiles:
    view = ref.at[pl.ds(start, size), :]
    if start + size <= s_len:
      out.append(view[...])
    else:
      rows = jax.lax.broadcasted_iota(jnp.int32, (size, ref.shape[1]), 0) < s_len - start
      out.append(plgpu.load(view, mask=rows, other=0.0))
  return out


def _load_mask(ref, rows, tiles):
  """The mask tile, one (block_t, size) bool array per key tile (the array is padded to the tiles' width)."""
  return [ref[rows, pl.ds(start, size)] for start, size in tiles]


def _probs(q, ks, valids, tiles, *, s_len: int, scale: float):
  """One query tile's softmax in fp32, normalised, one (block_t, size) array per key tile, and the row max m of
  the logits (in log2 units). valids: the mask tiles, or None. Masked logits are float32's min (XLA's value: a row
  with no key allowed is uniform over the real keys), padding keys -inf."""
  c = scale * LOG2E  # exp(x * scale - max) as exp2 of the logits in log2 units: one multiply, no range reduction.
  xs = []
  for i, ((start, size), k) in enumerate(zip(tiles, ks)):
    x = _dot(q, k, trans_b=True) * c
    real = None if start + size <= s_len else jax.lax.broadcasted_iota(jnp.int32, (1, size), 1) < s_len - start
    if valids is not None:
      x = jnp.where(valids[i], x, MASKED if real is None else jnp.where(real, MASKED, -jnp.inf))
    elif real is not None:
      x = jnp.where(real, x, -jnp.inf)
    xs.append(x)
  m = functools.reduce(jnp.maximum, [jnp.max(x, axis=1) for x in xs])
  ps = [jnp.exp2(x - m[:, None]) for x in xs]
  r = 1.0 / functools.reduce(jnp.add, [jnp.sum(p, axis=1) for p in ps])
  return [p * r[:, None] for p in ps], m


def _forward_kernel(q_ref, k_ref, v_ref, *refs, s_len: int, scale: float, block_t: int, masked: bool):
  # One (head, span, batch) per program. q_ref, o_ref: (span, H); k_ref, v_ref: (SP, H), SP = the key tiles'
  # total; m_ref: (span, SP) bool.
  m_ref, o_ref = refs if masked else (None, *refs)
  tiles = _key_tiles(s_len)
  ks, vs = _load_keys(k_ref, tiles, s_len), _load_keys(v_ref, tiles, s_len)

  def body(i, carry):
    rows = pl.ds(pl.multiple_of(i * block_t, block_t), block_t)
    valids = _load_mask(m_ref, rows, tiles) if masked else None
    ps, _ = _probs(q_ref[rows, :], ks, valids, tiles, s_len=s_len, scale=scale)
    o = functools.reduce(jnp.add, [_dot(p.astype(v.dtype), v) for p, v in zip(ps, vs)])
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, q_ref.shape[0] // block_t, body, 0)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, *refs, s_len: int, scale: float, block_t: int, masked: bool):
  # As the forward, plus do_ref, dq_ref: (span, H); dk_ref, dv_ref: (SP, H), this span's partial (rows < S kept).
  m_ref, dq_ref, dk_ref, dv_ref = refs if masked else (None, *refs)
  tiles = _key_tiles(s_len)
  ks, vs = _load_keys(k_ref, tiles, s_len), _load_keys(v_ref, tiles, s_len)

  def body(i, carry):
    dks, dvs = carry
    rows = pl.ds(pl.multiple_of(i * block_t, block_t), block_t)
    q, do = q_ref[rows, :], do_ref[rows, :]
    valids = _load_mask(m_ref, rows, tiles) if masked else None
    ps, m = _probs(q, ks, valids, tiles, s_len=s_len, scale=scale)
    dps = [_dot(do, v, trans_b=True) for v in vs]
    d = functools.reduce(jnp.add, [jnp.sum(p * dp, axis=1) for p, dp in zip(ps, dps)])
    # Masked logits are constants (XLA's where): no gradient. Elsewhere their P is 0 already; in a row with no key
    # allowed (m is the fill) it is not, so that row's dS is zeroed with the scale.
    g = jnp.where(m == MASKED, 0.0, scale)[:, None] if masked else scale
    dss = [(p * (dp - d[:, None]) * g).astype(q.dtype) for p, dp in zip(ps, dps)]
    dq_ref[rows, :] = functools.reduce(jnp.add, [_dot(ds, k) for ds, k in zip(dss, ks)]).astype(dq_ref.dtype)
    dks = [dk + _dot(ds, q, trans_a=True) for dk, ds in zip(dks, dss)]
    dvs = [dv + _dot(p.astype(v.dtype), do, trans_a=True) for dv, p, v in zip(dvs, ps, vs)]  # P as P @ V took it.
    return dks, dvs

  zeros = [jnp.zeros(k.shape, jnp.float32) for k in ks]
  dks, dvs = jax.lax.fori_loop(0, q_ref.shape[0] // block_t, body, (zeros, zeros))
  for (start, size), dk, dv in zip(tiles, dks, dvs):
    for ref, x in ((dk_ref, dk), (dv_ref, dv)):
      view, x = ref.at[pl.ds(start, size), :], x.astype(ref.dtype)
      if start + size <= s_len:
        view[...] = x
      else:
        plgpu.store(view, x, mask=jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) < s_len - start)


def _specs(q, k, mask, span: int):
  """BlockSpecs on the (head, split, batch) grid: q-like (span, H) tiles, a head's (SP, H) keys, the mask's
  (span, SP) tile (batch 0 when it is shared by the batch)."""
  h, sp = q.shape[-1], sum(size for _, size in _key_tiles(k.shape[1]))
  q_spec = pl.BlockSpec((None, span, None, h), lambda j, r, i: (i, r, j, 0))
  kv_spec = pl.BlockSpec((None, sp, None, h), lambda j, r, i: (i, 0, j, 0))
  m_spec = None
  if mask is not None:
    m_spec = pl.BlockSpec((None, span, sp), (lambda j, r, i: (i, r, 0)) if mask.shape[0] > 1 else
                          (lambda j, r, i: (0, r, 0)))
  return q_spec, kv_spec, m_spec


def _forward(q, k, v, mask, scale, interpret, config):
  b, t, n, _ = q.shape
  block_t, splits = _tiling(config[0], config[1], t, b * n, FORWARD_PROGRAMS)
  q_spec, kv_spec, m_spec = _specs(q, k, mask, t // splits)
  masked = mask is not None
  return pl.pallas_call(
      functools.partial(_forward_kernel, s_len=k.shape[1], scale=scale, block_t=block_t, masked=masked),
      grid=(n, splits, b), in_specs=[q_spec, kv_spec, kv_spec] + ([m_spec] if masked else []), out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config[2], num_stages=config[3]),
      interpret=interpret, name="cross_attention_forward",
  )(q, k, v, *([mask] if masked else []))


def _backward(q, k, v, mask, do, scale, interpret, config):
  b, t, n, h = q.shape
  s = k.shape[1]
  block_t, splits = _tiling(config[4], config[5], t, b * n, BACKWARD_PROGRAMS)
  q_spec, kv_spec, m_spec = _specs(q, k, mask, t // splits)
  masked = mask is not None
  part_spec = pl.BlockSpec((None, None, kv_spec.block_shape[1], None, h), lambda j, r, i: (r, i, 0, j, 0))
  part = jax.ShapeDtypeStruct((splits, b, s, n, h), jnp.float32 if splits > 1 else k.dtype)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_backward_kernel, s_len=s, scale=scale, block_t=block_t, masked=masked),
      grid=(n, splits, b), in_specs=[q_spec, kv_spec, kv_spec, q_spec] + ([m_spec] if masked else []),
      out_specs=[q_spec, part_spec, part_spec], out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), part, part],
      compiler_params=plgpu.CompilerParams(num_warps=config[6], num_stages=config[7]),
      interpret=interpret, name="cross_attention_backward",
  )(q, k, v, do.astype(q.dtype), *([mask] if masked else []))
  return dq, jnp.sum(dk, axis=0).astype(k.dtype), jnp.sum(dv, axis=0).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, interpret, config):
  return _forward(q, k, v, mask, scale, interpret, config)


def _attention_fwd(q, k, v, mask, scale, interpret, config):
  return _forward(q, k, v, mask, scale, interpret, config), (q, k, v, mask)


def _attention_bwd(scale, interpret, config, residuals, do):
  q, k, v, mask = residuals
  return (*_backward(q, k, v, mask, do, scale, interpret, config), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check_config(config) -> tuple[int, ...]:
  config = tuple(DEFAULT_CONFIG if config is None else config)
  if len(config) != len(DEFAULT_CONFIG) or not all(isinstance(c, int) and c >= 0 for c in config):
    raise ValueError(f"cross attention: config {config}: expected {len(DEFAULT_CONFIG)} non-negative ints "
                     "(fwd block_t, splits, num_warps, num_stages, then the same for the backward)")
  for block_t in (config[0], config[4]):
    if block_t < 16 or block_t & (block_t - 1):
      raise ValueError(f"cross attention: config {config}: block_t {block_t} is not a power of two >= 16")
  if min(config[2], config[3], config[6], config[7]) < 1:
    raise ValueError(f"cross attention: config {config}: num_warps and num_stages must be >= 1")
  return config


def _prepare_mask(mask, b: int, t: int, s: int):
  """The mask as (B or 1, T, SP) bool, SP the key tiles' width (columns past S False)."""
  if mask is None:
    return None
  if mask.dtype != jnp.bool_:
    raise ValueError(f"cross attention: mask dtype {mask.dtype}: expected bool (True = may attend)")
  shape = (1,) * (4 - mask.ndim) + tuple(mask.shape) if mask.ndim <= 4 else ()
  if not shape or shape[1] != 1 or any(m not in (1, want) for m, want in zip(shape, (b, 1, t, s))):
    raise ValueError(f"cross attention: mask {tuple(mask.shape)} is not broadcastable to ({b}, 1, {t}, {s}) "
                     "(one mask for all heads)")
  mask = mask.reshape(shape)
  if shape[2:] != (t, s):
    mask = jnp.broadcast_to(mask, (shape[0], 1, t, s))
  width = sum(size for _, size in _key_tiles(s))
  return jnp.pad(mask.reshape(shape[0], t, s), ((0, 0), (0, 0), (0, width - s)))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "config"))
def cross_attention(q, k, v, mask=None, *, scale: float, interpret: bool = False, config: tuple | None = None):
  """softmax(q k^T * scale, where mask) v, as `attention.dot_product_attention(..., implementation="xla")`, for few
  keys (`supported`); differentiable (Pallas backward; the mask gets no gradient).

  q: (B, T, N, H); k, v: (B, S, N, H), all of one dtype; mask: bool broadcastable to (B, 1, T, S) (True = may
  attend; shared by all heads) or None. Returns (B, T, N, H) in q's dtype. config: DEFAULT_CONFIG's layout.
  `interpret`: run the kernels on any backend (the tests, on the CPU)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"cross attention: q {q.shape}, k {k.shape}, v {v.shape}: expected (B, T, N, H) and "
                     "(B, S, N, H)")
  if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
    raise ValueError(f"cross attention: shapes q {q.shape}, k {k.shape}, v {v.shape} do not match")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"cross attention: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} differ")
  if not supported(q.shape, k.shape):
    raise ValueError(f"cross attention: q {q.shape}, k {k.shape} outside what the kernel takes (S <= "
                     f"{MAX_KEYS}, head size a power of two in [16, 128], T a multiple of 16)")
  b, t, _, _ = q.shape
  mask = _prepare_mask(mask, b, t, k.shape[1])
  return _attention(q, k, v, mask, float(scale), bool(interpret), _check_config(config))

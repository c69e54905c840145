"""Single-query attention over the int8 KV cache as one Pallas (Triton) kernel: the GPU implementation of
`attention.decode_attention_int8` (which dispatches here on GPU).

A batch-4 decode step of the 7B decoder reads 3.3 GB of int8 cache (3k tokens); XLA runs the two contractions as
generic reductions, reading it at ~2.6 TB/s on an H200 (BENCHMARKS.md, decode profile). Here one program takes
one (row, kv head, key split): it streams its keys in tiles, keeps an online softmax in fp32 (scales applied per
key to the logits and per value to the probabilities, as the XLA path does), and writes the unnormalised sum and
its (max, total); the splits are merged after. Splitting the keys gives enough programs at small batches (4 rows
x 32 heads = 128 without); the default aims at ~2048 programs (`default_config`: the tiling measured fastest of
those swept, benchmarks/decode_attention_sweep.py).

Converting the cache: every byte read is converted once; as plain int8 -> fp32 converts (a quarter-rate unit)
the ~100 M a layer takes ~24 us on an H200, about what reading its 103 MB takes, so the kernel converts by
`pallas_convert`'s bit trick on full-rate units instead.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from idmp_jax.models import pallas_convert

PROGRAMS = 2048  # Aimed-at (row, head, split) programs: splits = PROGRAMS // (rows * kv heads), in [1, 16].


def default_config(batch: int, kv_heads: int) -> tuple[int, int, int, int, str]:
  """(splits, block_s, num_warps, num_stages, convert): the tilings measured fastest on an H200 (vicuna-7b shape,
  benchmarks/decode_attention_sweep.py): 64-key tiles on 2 warps, the cache converted by `pallas_convert`'s bit
  trick ("asm": 51.0 us a layer at batch 4 against 62.3 with plain converts and XLA's 64.1; at batch 32 the
  fastest tiling too); few (row, kv head) pairs take PROGRAMS // pairs splits (batch 4: 16), many (batch 32:
  1024 pairs) 16."""
  pairs = batch * kv_heads
  splits = max(1, min(16, PROGRAMS // pairs)) if pairs <= PROGRAMS // 8 else 16
  return splits, 64, 2, 3, "asm"


def _attention_kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, valid_ref, *refs, groups: int, length: int,
                      block_s: int, chunk: int, scale: float, convert: str, update: bool):
  # One (row, kv head, split) per program. q_ref: (G, H) the queries of this kv head; k_ref, v_ref: (S, H) int8;
  # ks_ref, vs_ref: (S,) fp32 scales; valid_ref: (S,) int32 (1 = may attend). One split: out_refs = (o,) (G, H)
  # in the output dtype, normalised. Several: (acc (G, H), m (G,), l (G,)) in fp32, merged by the caller.
  # update: refs start with this step's key and value ((H,) int8, (1,) fp32 scales) and the slot (1,) they go
  # to, and end with the cache outputs (aliased to k_ref..vs_ref). Split 0 writes them there and takes them as
  # its first key; every split skips that slot of the cache (whose old contents it may read meanwhile).
  if update:
    kn_ref, vn_ref, kns_ref, vns_ref, slot_ref = refs[:5]
    out_refs, cache_refs = refs[5:-4], refs[-4:]
    slot = slot_ref[0]
  else:
    out_refs, slot = refs, -1
  first = pl.program_id(2) == 0
  lo = pl.program_id(2) * chunk
  hi = jnp.minimum(lo + chunk, length)
  qs = [q_ref[g, :].astype(jnp.float32) * scale for g in range(groups)]
  neg = jnp.float32(-1e30)

  def body(t, carry):
    nominal = lo + t * block_s
    start = jnp.minimum(nominal, length - block_s)  # The last tile slides back (never out of bounds) ...
    idx = start + jnp.arange(block_s)
    use = (idx >= nominal) & (idx < hi) & (valid_ref[pl.ds(start, block_s)] != 0)  # ... and skips what is done.
    use = use & (idx != slot)
    k = pallas_convert.int8_to(k_ref[pl.ds(start, block_s), :], jnp.float32, convert)
    v = pallas_convert.int8_to(v_ref[pl.ds(start, block_s), :], jnp.float32, convert)
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
  if update:  # The new key is split 0's first: its logit is the running max, its weight 1.
    kn, vn = kn_ref[...], vn_ref[...]
    knf, vnf = kn.astype(jnp.float32), vn.astype(jnp.float32) * vns_ref[0]
    init = []
    for g in range(groups):
      logit = jnp.sum(knf * qs[g]) * kns_ref[0]
      # (l as a convert: a where of two constants lowered to an i1 value in the Triton lowering.)
      init.append((jnp.where(first, vnf, 0.0), jnp.where(first, logit, neg), first.astype(jnp.float32)))

    @pl.when(first)
    def _():
      cache_refs[0][pl.ds(slot, 1), :] = kn[None, :]
      cache_refs[1][pl.ds(slot, 1), :] = vn[None, :]
      cache_refs[2][pl.ds(slot, 1)] = kns_ref[...]
      cache_refs[3][pl.ds(slot, 1)] = vns_ref[...]
  else:
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


def supported(q_shape, k_shape) -> bool:
  """Shapes the kernel takes (and where "auto" runs it: it measured faster than XLA at both batches timed, 7B on
  an H200: batch 4 812 vs 789 tok/s end to end; batch 32 330 vs 381 us a layer with default_config's tilings):
  one query, grouped heads up to 8 per kv head, a power-of-two head size >= 16 and at least 16 cached slots."""
  _, t, n, h = q_shape
  nk, s = k_shape[1], k_shape[2]
  return t == 1 and n % nk == 0 and n // nk <= 8 and s >= 16 and h >= 16 and not h & (h - 1)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention(q, k, v, k_scale, v_scale, valid, *, scale: float, config: tuple | None = None,
                     interpret: bool = False, new=None):
  """softmax(q k^T * scale, where valid) v over an int8 cache, the scales applied per key and per value as
  `attention.decode_attention_int8` does. q: (B, 1, N, H); k, v: (B, Nk, S, H) int8; k_scale, v_scale:
  (B, Nk, S) fp32; valid: (B, S) bool (each row must have a valid slot). Returns (B, 1, N, H) in q's dtype.
  config: (splits, block_s, num_warps, num_stages[, convert]), default `default_config`; splits > 1 divides each
  row's keys among that many programs, whose partial softmaxes are merged here; convert (default "asm") is
  `pallas_convert`'s. `interpret`: run the kernel on any backend (the tests, on the CPU; "asm" runs as "bits").

  new = (kv_new, kv_new_scale, slot): this step's own key and value, quantised and stacked ((2, B, Nk, H) int8,
  (2, B, Nk) fp32: [0] the key, [1] the value), and the cache slot () int32 they belong at (clamped into the
  cache, as a dynamic-update-slice would). The kernel writes them there (the cache buffers are its outputs,
  aliased: in place when the caller's cache is donated or loop-carried) and attends to them as that slot's key
  whatever `valid` says; returns (out, (k, v, k_scale, v_scale)). This replaces four cache writes a layer (0.16 ms
  less kernel time in an H200 b4 step of the 7B; its wall time did not change, BENCHMARKS.md)."""
  b, _, n, h = q.shape
  nk, s = k.shape[1], k.shape[2]
  splits, block_s, num_warps, num_stages, *convert = config or default_config(b, nk)
  convert = pallas_convert.resolve(convert[0] if convert else "asm", interpret, "int8 decode attention")
  groups = n // nk
  block_s = min(block_s, _block_s(s))
  if not supported(q.shape, k.shape):
    raise ValueError(f"int8 decode attention: q {q.shape}, cache {k.shape} outside what the kernel takes")
  chunk = pl.cdiv(pl.cdiv(s, splits), block_s) * block_s
  splits = pl.cdiv(s, chunk)
  qg = q.reshape(b, nk, groups, h)
  kv_spec = pl.BlockSpec((None, None, s, h), lambda i, j, c: (i, j, 0, 0))
  sc_spec = pl.BlockSpec((None, None, s), lambda i, j, c: (i, j, 0))
  in_specs = [pl.BlockSpec((None, None, groups, h), lambda i, j, c: (i, j, 0, 0)), kv_spec, kv_spec, sc_spec,
              sc_spec, pl.BlockSpec((None, s), lambda i, j, c: (i, 0))]
  args = [qg, k, v, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32), valid.astype(jnp.int32)]
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
  aliases = {}
  if new is not None:
    kv_new, kv_scale, slot = new
    if kv_new.shape != (2, b, nk, h) or kv_new.dtype != jnp.int8 or kv_scale.shape != (2, b, nk):
      raise ValueError(f"int8 decode attention: new key/value {kv_new.shape} {kv_new.dtype}, scales "
                       f"{kv_scale.shape}; expected (2, {b}, {nk}, {h}) int8 and (2, {b}, {nk})")
    # The stacked arrays go in twice, each spec reading its half (no sliced copies).
    vec_specs = [pl.BlockSpec((None, None, None, h), lambda i, j, c, x=x: (x, i, j, 0)) for x in (0, 1)]
    one_specs = [pl.BlockSpec((None, None, None, 1), lambda i, j, c, x=x: (x, i, j, 0)) for x in (0, 1)]
    in_specs += vec_specs + one_specs + [pl.BlockSpec((1,), lambda i, j, c: (0,))]
    kv_scale = kv_scale.astype(jnp.float32).reshape(2, b, nk, 1)
    slot = jnp.clip(jnp.asarray(slot, jnp.int32), 0, s - 1).reshape(1)  # Never a store outside the cache.
    args += [kv_new, kv_new, kv_scale, kv_scale, slot]
    aliases = {1 + i: len(out_shape) + i for i in range(4)}  # k, v, k_scale, v_scale -> the cache outputs.
    out_specs += [kv_spec, kv_spec, sc_spec, sc_spec]
    out_shape += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[1:5]]
  outs = pl.pallas_call(
      functools.partial(_attention_kernel, groups=groups, length=s, block_s=block_s, chunk=chunk, scale=scale,
                        convert=convert, update=new is not None),
      grid=(b, nk, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases, compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                                         num_stages=num_stages),
      interpret=interpret, name="int8_decode_attention",
  )(*args)
  cache = tuple(outs[-4:]) if new is not None else None
  outs = outs[:-4] if new is not None else outs
  if splits == 1:
    out = outs[0]
  else:
    acc, m, l = outs
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    out = (jnp.sum(acc * w[..., None], axis=2) / jnp.sum(l * w, axis=2)[..., None]).astype(q.dtype)
  out = out.reshape(b, 1, n, h)
  return out if new is None else (out, cache)

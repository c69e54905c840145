"""The feed-forward's GEGLU projection, y = value * gelu(gate) for [value | gate] = x W + b, with GEGLU in the
GEMM's epilogue, and its backward with dy = dz W2^T in the prologue: kernels measured by `geglu_probe.py` against
XLA's path (cuBLAS GEMMs and `layers.geglu`'s fused passes) and not kept in the model, because they lost
(BENCHMARKS.md, issue 5, 2026-12-03):

  `forward`        Triton (Pallas): (x, W, b) -> y [, h = [value | gate] when the backward is to read it].
  `backward`       Triton: (dz, W2, h) or (dz, W2, x, W, b) -> dh: dy = dz W2^T tile by tile in registers, value
                   and gate read from h or recomputed from x.
  `forward_mgpu`   Hopper (Mosaic GPU): `forward` with TMA loads by a producer warpgroup, wgmma by two consumer
                   warpgroups, the GEGLU epilogue stored by TMA; persistent over the SMs; optionally the tiles'
                   pipelines chained and the warpgroups splitting rows (`MGPU_TILING`).
  `backward_mgpu`  Hopper: `backward` (h read) the same way, dy = dz W2^T by wgmma, GEGLU's backward in the epilogue.

The Triton kernels view W (K, 2I) as (K, 2, I) and h, dh (rows, 2I) as (rows, 2, I), so that one program's
(value, gate) column tiles are one block (free reshapes).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# (block_m, block_n, block_k, num_warps, num_stages) unless given.
TILING = (128, 64, 64, 4, 3)

# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (clamped outside, where erf is +-1 in fp32): Eigen's float erf, which XLA's
# CPU and GPU backends also evaluate for fp32. Triton's Pallas lowering has no erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf(x):
  """fp32 erf from + - * / only (see _ERF_P)."""
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = jnp.full_like(x, _ERF_P[0])
  for c in _ERF_P[1:]:
    p = p * x2 + c
  q = jnp.full_like(x, _ERF_Q[0])
  for c in _ERF_Q[1:]:
    q = q * x2 + c
  return x * p / q


def _cdf(x):
  return 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def _dot(a, b, *, trans_b: bool = False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _value_gate(x_ref, w_ref, b_ref, k: int, bk: int, bm: int, bn: int, dtype, extra=None):
  """(value, gate) tiles in `dtype` (fp32 accumulation, the bias added before the one rounding), and optionally the
  accumulation of `extra(k0)` in the same loop over K."""
  def body(t, accs):
    k0 = pl.multiple_of(t * bk, bk)
    xt = x_ref[:, pl.ds(k0, bk)]
    out = (accs[0] + _dot(xt, w_ref[pl.ds(k0, bk), 0, :]), accs[1] + _dot(xt, w_ref[pl.ds(k0, bk), 1, :]))
    return out + ((accs[2] + extra(k0),) if extra else ())

  zeros = jnp.zeros((bm, bn), jnp.float32)
  accs = jax.lax.fori_loop(0, k // bk, body, (zeros,) * (3 if extra else 2))
  value = (accs[0] + b_ref[0, :].astype(jnp.float32)[None, :]).astype(dtype)
  gate = (accs[1] + b_ref[1, :].astype(jnp.float32)[None, :]).astype(dtype)
  return value, gate, (accs[2] if extra else None)


def _forward_kernel(x_ref, w_ref, b_ref, *out_refs, k: int, bk: int, bm: int, bn: int, save: bool):
  y_ref = out_refs[0]
  value, gate, _ = _value_gate(x_ref, w_ref, b_ref, k, bk, bm, bn, y_ref.dtype)
  if save:
    out_refs[1][:, 0, :] = value
    out_refs[1][:, 1, :] = gate
  v, g = value.astype(jnp.float32), gate.astype(jnp.float32)
  y_ref[...] = (v * g * _cdf(g)).astype(y_ref.dtype)


def _backward_kernel(*refs, c: int, bk: int, bm: int, bn: int, recompute: bool):
  if recompute:
    dz_ref, w2_ref, x_ref, w_ref, b_ref, dh_ref = refs
  else:
    dz_ref, w2_ref, h_ref, dh_ref = refs
  dtype = dh_ref.dtype
  dy_part = lambda k0: _dot(dz_ref[:, pl.ds(k0, bk)], w2_ref[:, pl.ds(k0, bk)], trans_b=True)
  if recompute:  # x and dz have the same width C: one loop, three accumulators.
    value, gate, dy = _value_gate(x_ref, w_ref, b_ref, c, bk, bm, bn, dtype, extra=dy_part)
  else:
    dy = jax.lax.fori_loop(0, c // bk, lambda t, acc: acc + dy_part(pl.multiple_of(t * bk, bk)),
                           jnp.zeros((bm, bn), jnp.float32))
    value, gate = h_ref[:, 0, :], h_ref[:, 1, :]
  dy = dy.astype(dtype).astype(jnp.float32)  # dy rounded as the unfused path's GEMM writes it.
  v, g = value.astype(jnp.float32), gate.astype(jnp.float32)
  cdf = _cdf(g)
  pdf = jnp.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
  dh_ref[:, 0, :] = (dy * g * cdf).astype(dtype)
  dh_ref[:, 1, :] = (dy * v * (cdf + g * pdf)).astype(dtype)


def supported(rows: int, k: int, inner: int, tiling=TILING) -> bool:
  bm, bn, bk = tiling[:3]
  return rows % bm == 0 and inner % bn == 0 and k % bk == 0 and rows > 0


def _check(rows, k, inner, tiling, what):
  if not supported(rows, k, inner, tiling):
    raise ValueError(f"GEGLU {what} kernel: {rows} rows, K {k}, inner {inner} do not divide into the tiling "
                     f"{tiling[:3]} (block_m, block_n, block_k)")


@functools.partial(jax.jit, static_argnames=("save", "tiling", "interpret"))
def forward(x, w, b, *, save: bool = False, tiling=TILING, interpret: bool = False):
  """y = value * gelu(gate) for [value | gate] = x w + b: x (rows, K), w (K, 2I), b (2I,); with `save`, (y, h)
  where h (rows, 2I) = [value | gate] in x's dtype."""
  (rows, k), inner = x.shape, w.shape[1] // 2
  if w.shape != (k, 2 * inner) or b.shape != (2 * inner,):
    raise ValueError(f"GEGLU forward kernel: x {x.shape}, w {w.shape}, b {b.shape} do not fit (K, 2I) and (2I,)")
  _check(rows, k, inner, tiling, "forward")
  bm, bn, bk, warps, stages = tiling
  out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
  out_shape = [jax.ShapeDtypeStruct((rows, inner), x.dtype)]
  if save:
    out_specs.append(pl.BlockSpec((bm, 2, bn), lambda i, j: (i, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((rows, 2, inner), x.dtype))
  out = pl.pallas_call(
      functools.partial(_forward_kernel, k=k, bk=bk, bm=bm, bn=bn, save=save),
      grid=(rows // bm, inner // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, 2, bn), lambda i, j: (0, 0, j)),
                pl.BlockSpec((2, bn), lambda i, j: (0, j))],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="geglu_forward",
  )(x, w.astype(x.dtype).reshape(k, 2, inner), b.reshape(2, inner))
  return (out[0], out[1].reshape(rows, 2 * inner)) if save else out[0]


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def backward(dz, w2, h=None, x=None, w=None, b=None, *, tiling=TILING, interpret: bool = False):
  """dh = d[value | gate] (rows, 2I) of z = (value * gelu(gate)) w2 for the cotangent dz (rows, C), w2 (I, C);
  value and gate from h (rows, 2I), or recomputed from x (rows, C), w (C, 2I), b (2I,) when h is None."""
  (rows, c), inner = dz.shape, w2.shape[0]
  recompute = h is None
  if w2.shape != (inner, c) or (recompute and (x is None or x.shape != (rows, c) or w.shape != (c, 2 * inner))) or (
      not recompute and h.shape != (rows, 2 * inner)):
    raise ValueError(f"GEGLU backward kernel: dz {dz.shape}, w2 {w2.shape}, h {None if h is None else h.shape}, "
                     f"x {None if x is None else x.shape} do not fit")
  _check(rows, c, inner, tiling, "backward")
  bm, bn, bk, warps, stages = tiling
  rowblock = pl.BlockSpec((bm, c), lambda i, j: (i, 0))
  in_specs = [rowblock, pl.BlockSpec((bn, c), lambda i, j: (j, 0))]
  if recompute:
    in_specs += [rowblock, pl.BlockSpec((c, 2, bn), lambda i, j: (0, 0, j)), pl.BlockSpec((2, bn), lambda i, j: (0, j))]
    operands = (x, w.astype(dz.dtype).reshape(c, 2, inner), b.reshape(2, inner))
  else:
    in_specs.append(pl.BlockSpec((bm, 2, bn), lambda i, j: (i, 0, j)))
    operands = (h.reshape(rows, 2, inner),)
  dh = pl.pallas_call(
      functools.partial(_backward_kernel, c=c, bk=bk, bm=bm, bn=bn, recompute=recompute),
      grid=(rows // bm, inner // bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, 2, bn), lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((rows, 2, inner), dz.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret, name="geglu_backward",
  )(dz, w2.astype(dz.dtype), *operands)
  return dh.reshape(rows, 2 * inner)


# ---- Hopper (Mosaic GPU): warp-specialised, persistent, TMA + wgmma -------------------------------------------------
# (tile_m, tile_n, tile_k, stages[, steady[, split_rows]]): each of the two compute warpgroups holds a (tile_m,
# tile_n) value and gate accumulator; a CTA covers 2 * tile_n columns of y (split_rows = 1: 2 * tile_m rows, the
# warpgroups sharing the weight tiles, e.g. 64 x 128 tiles for wider wgmma instructions). steady = 1: the tiles'
# pipelines chained (Mosaic GPU's pipeline of pipelines: the producer fetches the next tile's first K steps while
# the consumers run this tile's epilogue; K / tile_k must be a multiple of stages). With K = 320 (5 steps of 64)
# a pipeline restarted per tile idles the tensor cores at each start.
MGPU_TILING = (128, 64, 64, 2)


def _swizzled(plgpu_m, minor: int, dtype):
  """SMEM transforms for tiles whose minor dimension holds `minor` elements of `dtype` (TMA + wgmma swizzle)."""
  swizzle = plgpu_m.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return plgpu_m.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu_m.SwizzleTransform(swizzle)


def _pipeline_state(plgpu_m, info):
  """Chained pipelines: START on this SM's first tile, STOP on its last, STEADY between."""
  P = plgpu_m.PipelinePipeline
  last = info.num_local_steps - 1
  return jnp.where(info.local_index == 0, jnp.int32(P.START),
                   jnp.where(info.local_index == last, jnp.int32(P.STOP), jnp.int32(P.STEADY)))


def _mgpu_persistent(plgpu_m, operands, blocks, *, tiles, k_iters: int, stages: int, steady: bool, transforms,
                     out_smem, tile):
  """Both Hopper kernels' skeleton: one CTA per SM walks the (m, n) output tiles (`tiles`, a planar snake); per tile
  a warp-specialised pipeline over K feeds `blocks` ((shape, index) per operand) of `operands` to two compute
  warpgroups. `tile(mi, ni, wg, out_smem)` gives (mma body, compute context, the operands' slices for the tile)."""
  def pipeline(body, context, state=None):
    specs = [plgpu_m.BlockSpec(shape, index, transforms=transforms, memory_space=plgpu_m.SMEM)
             for shape, index in blocks]
    return plgpu_m.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=stages, compute_context=context, pipeline_state=state)

  ignore = lambda *_, **__: None

  @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*operands), out_smem=out_smem,
                     collective_axes="wg")
  def _scope(allocs, out_smem):
    wg = jax.lax.axis_index("wg")

    @plgpu_m.nd_loop((tiles[0] * tiles[1],), collective_axes="sm")
    def _tiles(info):
      (lin,) = info.index
      mi, ni = plgpu_m.planar_snake(lin, tiles, 1, 1)
      mma, context, slices = tile(mi, ni, wg, out_smem)
      state = _pipeline_state(plgpu_m, info) if steady else None
      pipeline(mma, context, state)(*slices, allocations=allocs)

  plgpu_m.wait_smem_to_gmem(0, wait_read_only=True)


def _mgpu_forward_kernel(x_gmem, w_gmem, b_gmem, y_gmem, h_gmem, *, tiling, num_sms: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu_m
  tile_m, tile_n, tile_k, stages = tiling[:4]
  steady = bool(tiling[4]) if len(tiling) > 4 else False
  split_rows = bool(tiling[5]) if len(tiling) > 5 else False
  (m, k), inner = x_gmem.shape, y_gmem.shape[1]
  dtype = x_gmem.dtype
  cta_m, cta_n = (2 * tile_m, tile_n) if split_rows else (tile_m, 2 * tile_n)
  save = h_gmem is not None

  def tile(mi, ni, wg, out_smem):
    cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
    # This warpgroup's part of the CTA's tiles, and its rows and columns of value, of gate and of y.
    wg_rows = pl.ds(wg * tile_m, tile_m) if split_rows else slice(None)
    wg_cols = slice(None) if split_rows else pl.ds(wg * tile_n, tile_n)
    row0 = mi * cta_m + (wg * tile_m if split_rows else 0)
    col0 = ni * cta_n + (0 if split_rows else wg * tile_n)
    rows, cols = pl.ds(row0, tile_m), pl.ds(col0, tile_n)

    def context(run):
      @functools.partial(pl.run_scoped, acc_v=plgpu_m.ACC((tile_m, tile_n), jnp.float32),
                         acc_g=plgpu_m.ACC((tile_m, tile_n), jnp.float32))
      def _accs(acc_v, acc_g):
        run((acc_v, acc_g))
        col = plgpu_m.Layout.WGMMA.reduce(0)
        bv = plgpu_m.load(b_gmem.at[0, cols], (), layout=col, optimized=False).astype(jnp.float32)
        bg = plgpu_m.load(b_gmem.at[1, cols], (), layout=col, optimized=False).astype(jnp.float32)
        shape = (tile_m, tile_n)
        value = (acc_v[...] + jax.lax.broadcast_in_dim(bv, shape, [1])).astype(dtype)
        gate = (acc_g[...] + jax.lax.broadcast_in_dim(bg, shape, [1])).astype(dtype)
        v, g = value.astype(jnp.float32), gate.astype(jnp.float32)
        y = (v * g * _cdf(g)).astype(dtype)  # No erf layout rule in Mosaic GPU: the polynomial.
        plgpu_m.wait_smem_to_gmem(0, wait_read_only=True)  # The previous tile's stores have read out_smem.
        out_smem[wg, 0] = y
        if save:
          out_smem[wg, 1] = value
          out_smem[wg, 2] = gate
        plgpu_m.commit_smem()
        plgpu_m.copy_smem_to_gmem(out_smem.at[wg, 0], y_gmem.at[rows, cols])
        if save:
          plgpu_m.copy_smem_to_gmem(out_smem.at[wg, 1], h_gmem.at[rows, cols])
          plgpu_m.copy_smem_to_gmem(out_smem.at[wg, 2], h_gmem.at[rows, pl.ds(inner + col0, tile_n)])

    def mma(idxs, x_smem, wv_smem, wg_smem, accs):
      acc_v, acc_g = accs
      plgpu_m.wgmma(acc_v, x_smem.at[wg_rows], wv_smem.at[:, wg_cols])
      plgpu_m.wgmma(acc_g, x_smem.at[wg_rows], wg_smem.at[:, wg_cols])
      plgpu_m.wgmma_wait(0)
      return accs

    return mma, context, (x_gmem.at[cta_rows, :], w_gmem.at[:, cta_cols],
                          w_gmem.at[:, pl.ds(inner + ni * cta_n, cta_n)])

  _mgpu_persistent(
      plgpu_m, (x_gmem, w_gmem, w_gmem),
      [((cta_m, tile_k), lambda kk: (0, kk)), ((tile_k, cta_n), lambda kk: (kk, 0)),
       ((tile_k, cta_n), lambda kk: (kk, 0))],
      tiles=(m // cta_m, inner // cta_n), k_iters=k // tile_k, stages=stages, steady=steady,
      transforms=_swizzled(plgpu_m, tile_k, dtype),
      out_smem=plgpu_m.SMEM((2, 3 if save else 1, tile_m, tile_n), dtype,
                            transforms=_swizzled(plgpu_m, tile_n, dtype)),
      tile=tile)


def mgpu_supported(rows: int, k: int, inner: int, tiling=MGPU_TILING, num_sms: int = 132) -> bool:
  """Whole tiles; chained pipelines (steady) need K's steps in whole rounds of `stages` and two tiles per SM at
  least (the first and last pipeline of an SM differ)."""
  tile_m, tile_n, tile_k, stages = tiling[:4]
  steady = len(tiling) > 4 and tiling[4]
  cta_m, cta_n = (2 * tile_m, tile_n) if len(tiling) > 5 and tiling[5] else (tile_m, 2 * tile_n)
  tiles = rows // cta_m * (inner // cta_n)
  return (rows % cta_m == 0 and inner % cta_n == 0 and k % tile_k == 0
          and (not steady or (k // tile_k % stages == 0 and tiles >= 2 * num_sms)))


@functools.partial(jax.jit, static_argnames=("save", "tiling", "num_sms"))
def forward_mgpu(x, w, b, *, save: bool = False, tiling=MGPU_TILING, num_sms: int | None = None):
  """`forward` as a Hopper kernel (Mosaic GPU: TMA loads by a producer warpgroup, wgmma by two consumers, the
  GEGLU epilogue stored by TMA while the next tile's loads run). bf16/fp16 only; H100/H200."""
  from jax.experimental.pallas import mosaic_gpu as plgpu_m
  (rows, k), inner = x.shape, w.shape[1] // 2
  if w.shape != (k, 2 * inner) or b.shape != (2 * inner,):
    raise ValueError(f"GEGLU forward kernel: x {x.shape}, w {w.shape}, b {b.shape} do not fit (K, 2I) and (2I,)")
  num_sms = num_sms or jax.devices()[0].core_count
  if not mgpu_supported(rows, k, inner, tiling, num_sms):
    raise ValueError(f"GEGLU Hopper kernel: {rows} rows, K {k}, inner {inner} do not divide into {tiling}")
  out_type = [jax.ShapeDtypeStruct((rows, inner), x.dtype)]
  if save:
    out_type.append(jax.ShapeDtypeStruct((rows, 2 * inner), x.dtype))

  def body(x_gmem, w_gmem, b_gmem, y_gmem, *h):
    _mgpu_forward_kernel(x_gmem, w_gmem, b_gmem, y_gmem, h[0] if h else None, tiling=tiling, num_sms=num_sms)

  out = plgpu_m.kernel(
      body, out_type=out_type, grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu_m.CompilerParams(lowering_semantics=plgpu_m.LoweringSemantics.Warpgroup),
  )(x, w.astype(x.dtype), b.astype(x.dtype).reshape(2, inner))
  return (out[0], out[1]) if save else out[0]


def _mgpu_backward_kernel(dz_gmem, w2t_gmem, h_gmem, dh_gmem, *, tiling, num_sms: int):
  from jax.experimental.pallas import mosaic_gpu as plgpu_m
  tile_m, tile_n, tile_k, stages = tiling[:4]
  steady = bool(tiling[4]) if len(tiling) > 4 else False
  (m, c), inner = dz_gmem.shape, w2t_gmem.shape[1]
  dtype = dz_gmem.dtype
  cta_n = 2 * tile_n

  def tile(mi, ni, wg, out_smem):
    rows, wg_cols = pl.ds(mi * tile_m, tile_m), pl.ds(wg * tile_n, tile_n)
    col0 = ni * cta_n + wg * tile_n
    cols = pl.ds(col0, tile_n)

    def context(run):
      @functools.partial(pl.run_scoped, acc=plgpu_m.ACC((tile_m, tile_n), jnp.float32))
      def _acc(acc):
        run(acc)
        wgmma = plgpu_m.Layout.WGMMA
        # value and gate straight from HBM in the accumulator's layout (they are read once).
        v = plgpu_m.load(h_gmem.at[rows, cols], (), layout=wgmma, optimized=False).astype(jnp.float32)
        g = plgpu_m.load(h_gmem.at[rows, pl.ds(inner + col0, tile_n)], (), layout=wgmma,
                         optimized=False).astype(jnp.float32)
        dy = acc[...].astype(dtype).astype(jnp.float32)  # Rounded as the unfused path's GEMM writes it.
        cdf = _cdf(g)
        pdf = jnp.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
        plgpu_m.wait_smem_to_gmem(0, wait_read_only=True)
        out_smem[wg, 0] = (dy * g * cdf).astype(dtype)
        out_smem[wg, 1] = (dy * v * (cdf + g * pdf)).astype(dtype)
        plgpu_m.commit_smem()
        plgpu_m.copy_smem_to_gmem(out_smem.at[wg, 0], dh_gmem.at[rows, cols])
        plgpu_m.copy_smem_to_gmem(out_smem.at[wg, 1], dh_gmem.at[rows, pl.ds(inner + col0, tile_n)])

    def mma(idxs, dz_smem, w_smem, acc):
      plgpu_m.wgmma(acc, dz_smem, w_smem.at[:, wg_cols])
      plgpu_m.wgmma_wait(0)
      return acc

    return mma, context, (dz_gmem.at[rows, :], w2t_gmem.at[:, pl.ds(ni * cta_n, cta_n)])

  _mgpu_persistent(
      plgpu_m, (dz_gmem, w2t_gmem), [((tile_m, tile_k), lambda kk: (0, kk)), ((tile_k, cta_n), lambda kk: (kk, 0))],
      tiles=(m // tile_m, inner // cta_n), k_iters=c // tile_k, stages=stages, steady=steady,
      transforms=_swizzled(plgpu_m, tile_k, dtype),
      out_smem=plgpu_m.SMEM((2, 2, tile_m, tile_n), dtype, transforms=_swizzled(plgpu_m, tile_n, dtype)),
      tile=tile)


@functools.partial(jax.jit, static_argnames=("tiling", "num_sms"))
def backward_mgpu(dz, w2, h, *, tiling=MGPU_TILING, num_sms: int | None = None):
  """`backward` (h read) as a Hopper kernel: dy = dz w2^T by wgmma (w2^T made by XLA: a small frozen weight),
  GEGLU's backward in the epilogue with value and gate read from h, dh stored by TMA. bf16/fp16 only."""
  from jax.experimental.pallas import mosaic_gpu as plgpu_m
  (rows, c), inner = dz.shape, w2.shape[0]
  if w2.shape != (inner, c) or h.shape != (rows, 2 * inner):
    raise ValueError(f"GEGLU backward kernel: dz {dz.shape}, w2 {w2.shape}, h {h.shape} do not fit")
  num_sms = num_sms or jax.devices()[0].core_count
  if len(tiling) > 5 and tiling[5]:
    raise ValueError("GEGLU Hopper backward kernel: its warpgroups split columns only (no split_rows)")
  if not mgpu_supported(rows, c, inner, tiling, num_sms):
    raise ValueError(f"GEGLU Hopper kernel: {rows} rows, K {c}, inner {inner} do not divide into {tiling}")
  return plgpu_m.kernel(
      functools.partial(_mgpu_backward_kernel, tiling=tiling, num_sms=num_sms),
      out_type=jax.ShapeDtypeStruct((rows, 2 * inner), dz.dtype), grid=(num_sms,), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu_m.CompilerParams(lowering_semantics=plgpu_m.LoweringSemantics.Warpgroup),
  )(dz, w2.astype(dz.dtype).T, h)

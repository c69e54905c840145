"""The transformer blocks' GEGLU feed-forward on the SD-2 UNet's shapes at b32, 512 px: XLA's path (cuBLAS GEMMs and
`layers.geglu`'s fused passes) against the kernels of `geglu_kernels.py` (issue 5; not in the model: they lost).
Per shape (rows, C), inner I = 4C:

  fwd    x -> y = GEGLU(x W + b): XLA's GEMM + GEGLU pass; the Triton kernel with h saved ("save") or not
         ("nosave"); the Hopper (Mosaic GPU) kernel likewise ("mgpu save", "mgpu nosave")
  bwd    (dz, ...) -> dh: XLA's dy = dz W2^T GEMM + GEGLU backward pass; the Triton kernel reading h ("saved") or
         recomputing it from x ("recompute"); the Hopper kernel reading h ("mgpu saved")
  ff     the whole feed-forward x -> z = y W2 + b2, forward + backward to dx, for XLA and the best tiling of each
         kernel pair ("mgpu": the Hopper forward, XLA's backward; "mgpu2": both Hopper kernels)

  python benchmarks/geglu_probe.py            # on the GPU
  python benchmarks/geglu_probe.py --small    # CPU smoke test (kernels interpreted, tiny shapes)

Each timing is a jit over --buffers distinct inputs (the kernels' time, not the dispatch's); variants run in
--rounds interleaved rounds and the medians are printed, with TFLOP/s of the pass's GEMM work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402
from benchmarks.lora_kernels_probe import SHAPES  # noqa: E402
from benchmarks import geglu_kernels as pallas_geglu  # noqa: E402
from idmp_jax.models import layers  # noqa: E402


def tiling(text: str) -> tuple[int, ...]:
  """'BM,BN,BK,WARPS,STAGES'."""
  return tuple(int(v) for v in text.split(","))


def feed_forward(mode: str, w, b, w2, b2, fwd_tiling=None, bwd_tiling=None, interpret=False):
  """x -> z for mode "xla", "save" (h kept for the backward) or "recompute"."""
  def xla(x):
    return jnp.dot(layers.geglu(jnp.dot(x, w) + b), w2) + b2
  if mode == "xla":
    return xla

  @jax.custom_vjp
  def ff(x):
    return xla(x)

  def fwd(x):
    if mode in ("mgpu", "mgpu2"):
      y, h = pallas_geglu.forward_mgpu(x, w, b, save=True, tiling=fwd_tiling)
      return jnp.dot(y, w2) + b2, h
    if mode == "save":
      y, h = pallas_geglu.forward(x, w, b, save=True, tiling=fwd_tiling, interpret=interpret)
      return jnp.dot(y, w2) + b2, h
    return jnp.dot(pallas_geglu.forward(x, w, b, tiling=fwd_tiling, interpret=interpret), w2) + b2, x

  def bwd(res, dz):
    if mode == "mgpu":
      dh = layers._geglu_bwd(res, jnp.dot(dz, w2.T))[0]
    elif mode == "mgpu2":
      dh = pallas_geglu.backward_mgpu(dz, w2, res, tiling=bwd_tiling)
    elif mode == "save":
      dh = pallas_geglu.backward(dz, w2, h=res, tiling=bwd_tiling, interpret=interpret)
    else:
      dh = pallas_geglu.backward(dz, w2, x=res, w=w, b=b, tiling=bwd_tiling, interpret=interpret)
    return (jnp.dot(dh, w.T),)

  ff.defvjp(fwd, bwd)
  return ff


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--levels", type=int, default=3, help="the first N shapes (largest first; the 8x8 level has one)")
  p.add_argument("--tilings", type=tiling, nargs="*",
                 default=[(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 32, 4, 4),
                          (64, 64, 64, 4, 3), (128, 128, 32, 8, 3)],
                 help="Triton kernel tilings, each 'BM,BN,BK,WARPS,STAGES'")
  p.add_argument("--mgpu", type=tiling, nargs="*",
                 default=[(128, 64, 64, 2), (64, 64, 64, 4), (128, 64, 32, 5, 1), (64, 64, 32, 5, 1),
                          (128, 64, 32, 2, 1), (64, 128, 64, 2, 0, 1), (64, 128, 32, 5, 1, 1)],
                 help="Hopper (Mosaic GPU) forward tilings, each 'TILE_M,TILE_N,TILE_K,STAGES[,STEADY[,SPLIT_ROWS]]' "
                 "(STEADY 1: the tiles' pipelines chained; SPLIT_ROWS 1: the warpgroups split rows, not columns; "
                 "geglu_kernels.MGPU_TILING)")
  p.add_argument("--mgpu-bwd", type=tiling, nargs="*",
                 default=[(128, 64, 64, 2), (128, 64, 32, 5, 1), (128, 128, 64, 2), (64, 128, 32, 5, 1)],
                 help="Hopper backward tilings, each 'TILE_M,TILE_N,TILE_K,STAGES[,STEADY]'")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  shapes = ((256, 128),) if args.small else SHAPES[:args.levels]
  tilings = [(64, 64, 64, 4, 2)] if args.small else args.tilings
  interpret = args.small
  arr = lambda *shape, s=1.0: jnp.asarray(rng.standard_normal(shape) * s, jnp.bfloat16)
  print(f"{'rows x C':>14s} {'pass':5s} {'impl':34s} {'us':>9s} {'TFLOP/s':>8s}  (median of {args.rounds} rounds)",
        flush=True)
  for rows, c in shapes:
    inner = 4 * c
    w, b = arr(c, 2 * inner, s=c ** -0.5), arr(2 * inner, s=0.1)
    w2, b2 = arr(inner, c, s=inner ** -0.5), arr(c, s=0.1)
    xs = [arr(rows, c) for _ in range(args.buffers)]
    dzs = [arr(rows, c) for _ in range(args.buffers)]
    hs = [jnp.dot(x, w) + b for x in xs]
    gemm = 2 * rows * c * 2 * inner  # One (rows, C) x (C, 2I) GEMM's FLOPs; dy = dz W2^T is half of it.
    variants = [  # (pass, impl, fn over the buffers, inputs, GEMM FLOPs)
        ("fwd", "xla", lambda xs: [layers.geglu(jnp.dot(x, w) + b) for x in xs], (xs,), gemm),
        ("bwd", "xla", lambda dzs, hs: [jax.vjp(layers.geglu, h)[1](jnp.dot(dz, w2.T))[0] for dz, h in zip(dzs, hs)],
         (dzs, hs), gemm // 2)]
    for t in ([] if interpret else args.mgpu):
      if not pallas_geglu.mgpu_supported(rows, c, inner, t, jax.devices()[0].core_count):
        continue
      kw = dict(tiling=t)
      name = ",".join(map(str, t))
      variants += [
          ("fwd", f"mgpu save {name}",
           lambda xs, kw=kw: [pallas_geglu.forward_mgpu(x, w, b, save=True, **kw) for x in xs], (xs,), gemm),
          ("fwd", f"mgpu nosave {name}",
           lambda xs, kw=kw: [pallas_geglu.forward_mgpu(x, w, b, **kw) for x in xs], (xs,), gemm)]
    for t in ([] if interpret else args.mgpu_bwd):
      if pallas_geglu.mgpu_supported(rows, c, inner, t, jax.devices()[0].core_count):
        variants.append(("bwd", f"mgpu saved {','.join(map(str, t))}",
                         lambda dzs, hs, t=t: [pallas_geglu.backward_mgpu(dz, w2, h, tiling=t)
                                               for dz, h in zip(dzs, hs)],
                         (dzs, hs), gemm // 2))
    for t in tilings:
      if not pallas_geglu.supported(rows, c, inner, t):
        continue
      kw = dict(tiling=t, interpret=interpret)
      name = ",".join(map(str, t))
      variants += [
          ("fwd", f"save {name}", lambda xs, kw=kw: [pallas_geglu.forward(x, w, b, save=True, **kw) for x in xs],
           (xs,), gemm),
          ("fwd", f"nosave {name}", lambda xs, kw=kw: [pallas_geglu.forward(x, w, b, **kw) for x in xs], (xs,), gemm),
          ("bwd", f"saved {name}",
           lambda dzs, hs, kw=kw: [pallas_geglu.backward(dz, w2, h=h, **kw) for dz, h in zip(dzs, hs)],
           (dzs, hs), gemm // 2),
          ("bwd", f"recompute {name}",
           lambda dzs, xs, kw=kw: [pallas_geglu.backward(dz, w2, x=x, w=w, b=b, **kw) for dz, x in zip(dzs, xs)],
           (dzs, xs), gemm // 2 + gemm)]
    times = run_rounds([(p_, impl, jax.jit(fn), ins) for p_, impl, fn, ins, _ in variants], args, rows, c)
    flops = {(p_, impl): f for p_, impl, _, _, f in variants}
    best = {}
    for pass_ in ("fwd", "bwd"):
      for (p_, impl), ts in times.items():
        if p_ == pass_:
          us = statistics.median(ts)
          print(f"{rows:>7d} x {c:<5d} {p_:5s} {impl:34s} {us:9.1f} {flops[(p_, impl)] / (us * 1e6):8.0f}", flush=True)
          kind = " ".join(impl.split()[:-1])
          if impl != "xla" and us < best.get(kind, (None, float("inf")))[1]:
            best[kind] = (tiling(impl.split()[-1]), us)
    # The whole feed-forward, forward + backward to dx, with the best tilings.
    ff_variants = []
    for mode, fkind, bkind in (("xla", None, None), ("save", "save", "saved"), ("recompute", "nosave", "recompute"),
                               ("mgpu", "mgpu save", None), ("mgpu2", "mgpu save", "mgpu saved")):
      if mode != "xla" and (fkind not in best or (bkind and bkind not in best)):
        continue
      ft, bt = (best[fkind][0], bkind and best[bkind][0]) if mode != "xla" else (None, None)
      if mode == "mgpu2":  # The Hopper backward's dh against XLA's.
        want = jax.vjp(layers.geglu, hs[0])[1](jnp.dot(dzs[0], w2.T))[0]
        got = pallas_geglu.backward_mgpu(dzs[0], w2, hs[0], tiling=bt)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        print(f"{rows:>7d} x {c:<5d} bwd   mgpu dh max rel err {np.abs(got - want).max() / np.abs(want).max():.2e}")
      if mode == "mgpu":
        # Check the Hopper kernel's y and h against XLA's before timing it.
        y, h = pallas_geglu.forward_mgpu(xs[0], w, b, save=True, tiling=ft)
        want_h = jnp.dot(xs[0], w) + b
        for what, got, want in (("h", h, want_h), ("y", y, layers.geglu(want_h))):
          got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
          err = np.abs(got - want).max() / np.abs(want).max()
          print(f"{rows:>7d} x {c:<5d} fwd   mgpu {what} max rel err {err:.2e}")
      fn = feed_forward(mode, w, b, w2, b2, ft, bt, interpret)
      step = lambda xs, dzs, fn=fn: [jax.vjp(fn, x)[1](dz)[0] for x, dz in zip(xs, dzs)]
      ff_variants.append(("ff", mode if mode == "xla" else f"{mode} {ft} / {bt}", jax.jit(step), (xs, dzs)))
    ref = np.asarray(ff_variants[0][2](xs[:1], dzs[:1])[0], np.float32)
    for _, impl, fn, _ in ff_variants[1:]:
      got = np.asarray(fn(xs[:1], dzs[:1])[0], np.float32)
      print(f"{rows:>7d} x {c:<5d} ff    {impl:34s} dx max rel err {np.abs(got - ref).max() / np.abs(ref).max():.2e}")
    times = run_rounds(ff_variants, args, rows, c)
    for (_, impl), ts in times.items():
      us = statistics.median(ts)
      print(f"{rows:>7d} x {c:<5d} ff    {impl:34s} {us:9.1f} {3 * gemm * 1.5 / (us * 1e6):8.0f}", flush=True)


def run_rounds(variants, args, rows, c):
  times = {}
  for _ in range(args.rounds):
    for pass_, impl, fn, inputs in variants:
      key = (pass_, impl)
      if times.get(key) == "failed":
        continue
      try:
        times.setdefault(key, []).append(timed(fn, inputs, args.buffers, args.iters))
      except Exception as e:  # A tiling Triton does not compile: say so and go on.
        print(f"{rows:>7d} x {c:<5d} {pass_:5s} {impl:34s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        times[key] = "failed"
  return {k: v for k, v in times.items() if v != "failed"}


if __name__ == "__main__":
  main()

"""Times the Pallas decode kernels of idmp_jax/models/int8_kernels.py against XLA on the vicuna-7b decode shapes
(batch 4) over a grid of tile choices, and writes the fastest choice per shape as the kernels' tuning table
(`IDMP_INT8_KERNELS_TUNING`); a shape where XLA is fastest is written as "xla".

  python benchmarks/int8_kernels_sweep.py --out tuning.json      # on the GPU
  python benchmarks/int8_kernels_sweep.py --small                # CPU: the kernels interpreted, a smoke test

Method: each timed call is one jit that runs the kernel once on each of --buffers distinct weight (or cache)
buffers (so nothing is served from L2 and per-call dispatch is amortised); median of --iters calls after two
warm-ups, divided by the buffers. Reported: microseconds per kernel and GB/s of int8 bytes read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.models import attention, int8_kernels

GEMV_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # q/k/v/o, gate/up, down
DOT = [(32, 512, 4, 4), (64, 256, 4, 4), (64, 256, 8, 4), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
       (32, 256, 4, 5), (64, 512, 8, 3)]
FMA = [(128, 32, 4, 3), (128, 32, 8, 3), (256, 32, 8, 3), (256, 16, 4, 3), (512, 16, 8, 3), (128, 64, 8, 2),
       (64, 64, 4, 3), (256, 64, 8, 2)]
ATTENTION = [(1, 256, 4, 2), (4, 256, 4, 2), (8, 128, 4, 2), (8, 256, 8, 2), (16, 128, 4, 3), (4, 128, 8, 3),
             (8, 64, 4, 3), (16, 64, 2, 3)]


def timed(fn, args, buffers: int, iters: int) -> float:
  """Microseconds per kernel."""
  out = fn(*args)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  del out
  return 1e6 * statistics.median(times) / buffers


def sweep_gemv(k, n, rows, buffers, iters, interpret, rng):
  ws = [jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8)) for _ in range(buffers)]
  ss = [jnp.asarray(rng.uniform(0.001, 0.01, n).astype(np.float32)) for _ in range(buffers)]
  x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
  ref = np.asarray(x, np.float32) @ (np.asarray(ws[0], np.float32) * np.asarray(ss[0]))
  xla = jax.jit(lambda x, ws, ss: [jnp.dot(x, w.astype(x.dtype)) * s.astype(x.dtype) for w, s in zip(ws, ss)])
  results = [("xla", timed(xla, (x, ws, ss), buffers, iters))]
  for style, grid in (("dot", DOT), ("fma", FMA)):
    for bn, bk, warps, stages in grid:
      cfg = (style, bn, bk, warps, stages)
      if n % bn or k % bk or (style == "fma" and rows > int8_kernels.FMA_MAX_ROWS):
        continue
      f = jax.jit(lambda x, ws, ss, cfg=cfg: [int8_kernels.gemv(x, w, s, config=cfg, interpret=interpret)
                                              for w, s in zip(ws, ss)])
      try:
        us = timed(f, (x, ws, ss), buffers, iters)
        y = np.asarray(jax.jit(lambda x, w, s: int8_kernels.gemv(x, w, s, config=cfg, interpret=interpret))(
            x, ws[0], ss[0]), np.float32)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        results.append((cfg, us) if err < 2e-2 else (cfg, f"wrong: relative error {err:.2e}"))
      except Exception as e:  # noqa: BLE001 -- a tiling that does not compile is a result.
        results.append((cfg, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
  return results


def sweep_attention(b, n, s, h, buffers, iters, interpret, rng):
  def cache():
    return (jnp.asarray(rng.integers(-127, 128, (b, n, s, h), dtype=np.int8)),
            jnp.asarray(rng.uniform(0.001, 0.02, (b, n, s)).astype(np.float32)))
  ks, vs = [cache() for _ in range(buffers)], [cache() for _ in range(buffers)]
  q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.bfloat16)
  valid = jnp.asarray(np.arange(s)[None, :] < s - 40).repeat(b, 0)
  mask = valid[:, None, None, :]
  xla = jax.jit(lambda q, ks, vs: [attention.decode_attention_int8(q, k[0], v[0], k[1], v[1], mask=mask)
                                   for k, v in zip(ks, vs)])
  ref = np.asarray(xla(q, ks[:1], vs[:1])[0], np.float32)
  results = [("xla", timed(xla, (q, ks, vs), buffers, iters))]
  for cfg in ATTENTION:
    f = jax.jit(lambda q, ks, vs, cfg=cfg: [int8_kernels.decode_attention(
        q, k[0], v[0], k[1], v[1], valid, scale=h ** -0.5, config=cfg, interpret=interpret) for k, v in zip(ks, vs)])
    try:
      us = timed(f, (q, ks, vs), buffers, iters)
      y = np.asarray(f(q, ks[:1], vs[:1])[0], np.float32)
      err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
      results.append((cfg, us) if err < 2e-2 else (cfg, f"wrong: relative error {err:.2e}"))
    except Exception as e:  # noqa: BLE001
      results.append((cfg, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
  return results


def report(name, results, nbytes):
  print(f"\n{name}: {nbytes / 1e6:.1f} MB int8 read per call", flush=True)
  for cfg, r in results:
    line = f"{r:8.1f} us  {nbytes / (r * 1e-6) / 1e9:7.0f} GB/s" if isinstance(r, float) else f"  {r}"
    print(f"  {str(cfg):28} {line}", flush=True)
  ok = [(cfg, r) for cfg, r in results if isinstance(r, float)]
  return min(ok, key=lambda t: t[1])[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--rows", type=int, default=4)
  ap.add_argument("--buffers", type=int, default=16)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  interpret = args.small
  shapes = ((256, 512), (512, 256)) if args.small else GEMV_SHAPES
  b, n, s, h = (2, 2, 300, 64) if args.small else (args.rows, 32, 3064, 128)
  buffers, iters = (2, 1) if args.small else (args.buffers, args.iters)
  if args.small:
    global DOT, FMA, ATTENTION
    DOT, FMA, ATTENTION = DOT[1:2], FMA[:1], ATTENTION[:2]
  print(f"devices: {jax.devices()}", flush=True)
  table = {"gemv": {}, "attention": None}
  for k, nn in shapes:
    best = report(f"gemv rows {args.rows} K {k} N {nn}", sweep_gemv(k, nn, args.rows, buffers, iters, interpret, rng),
                  k * nn)
    table["gemv"][f"{k},{nn}"] = ["xla"] if best == "xla" else list(best)
  best = report(f"decode attention b{b} heads {n} S {s} H {h}",
                sweep_attention(b, n, s, h, max(2, buffers // 4), iters, interpret, rng), 2 * b * n * s * (h + 4))
  table["attention"] = ["xla"] if best == "xla" else list(best)
  print(json.dumps(table), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(table, f)


if __name__ == "__main__":
  main()

"""Times the int8-cache decode attention kernel (idmp_jax/models/pallas_attention.py) against XLA's
(attention.decode_attention_int8, implementation="xla") over a grid of tilings, on the vicuna-7b decode shape.

  python benchmarks/decode_attention_sweep.py [--rows 4]      # on the GPU
  python benchmarks/decode_attention_sweep.py --small         # CPU: the kernel interpreted, a smoke test

Method: one jit runs the attention once on each of --buffers distinct caches (nothing is served from L2); median
of --iters calls after two warm-ups, at --buffers and at a quarter of them: the difference over the extra buffers
is the time per attention with the jit's dispatch removed (the first sweeps divided one call by the buffers, so
their figures carried a share of the dispatch). Each tiling's output is checked
against XLA's (bf16 tolerance) before it is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.models import attention, pallas_attention

# (splits, block_s, num_warps, num_stages, convert): the int8 -> fp32 convert by instructions ("cast") or by
# pallas_convert's bit trick ("asm").
ATTENTION = [(16, 128, 4, 3, "cast"), (16, 128, 4, 3, "asm"), (8, 128, 4, 3, "asm"), (16, 64, 2, 3, "cast"),
             (16, 64, 2, 3, "asm"), (16, 64, 4, 3, "asm"), (8, 256, 8, 3, "asm"), (16, 128, 8, 3, "asm")]


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


def marginal(fn, args_many, args_few, extra: int, iters: int) -> float:
  """Microseconds per extra item: (time of fn on args_many - on args_few) / extra, so that the jit's dispatch,
  the same in both, drops out (args_* hold `extra` more and fewer distinct buffers)."""
  return (timed(fn, args_many, 1, iters) - timed(fn, args_few, 1, iters)) / extra


def sweep_attention(b, n, s, h, buffers, iters, interpret, rng, grid):
  def cache():
    return (jnp.asarray(rng.integers(-127, 128, (b, n, s, h), dtype=np.int8)),
            jnp.asarray(rng.uniform(0.001, 0.02, (b, n, s)).astype(np.float32)))
  ks, vs = [cache() for _ in range(buffers)], [cache() for _ in range(buffers)]
  q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.bfloat16)
  valid = jnp.asarray(np.arange(s)[None, :] < s - 40).repeat(b, 0)
  mask = valid[:, None, None, :]
  xla = jax.jit(lambda q, ks, vs: [attention.decode_attention_int8(q, k[0], v[0], k[1], v[1], mask=mask,
                                                                   implementation="xla")
                                   for k, v in zip(ks, vs)])
  ref = np.asarray(xla(q, ks[:1], vs[:1])[0], np.float32)
  few = max(1, buffers // 4) if buffers > 1 else 0

  per_call = lambda f: marginal(f, (q, ks, vs), (q, ks[:few], vs[:few]), buffers - few, iters)
  results = [("xla", per_call(xla))]
  for cfg in grid:
    f = jax.jit(lambda q, ks, vs, cfg=cfg: [pallas_attention.decode_attention(
        q, k[0], v[0], k[1], v[1], valid, scale=h ** -0.5, config=cfg, interpret=interpret) for k, v in zip(ks, vs)])
    try:
      us = per_call(f)
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
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  b, n, s, h = (2, 2, 300, 64) if args.small else (args.rows, 32, 3064, 128)
  buffers, iters = (2, 1) if args.small else (args.buffers, args.iters)
  grid = ATTENTION[:2] if args.small else ATTENTION
  print(f"devices: {jax.devices()}; default tiling at this shape: {pallas_attention.default_config(b, n)}", flush=True)
  best = report(f"decode attention b{b} heads {n} S {s} H {h}",
                sweep_attention(b, n, s, h, buffers, iters, args.small, rng, grid), 2 * b * n * s * (h + 4))
  print(f"fastest: {best}", flush=True)


if __name__ == "__main__":
  main()

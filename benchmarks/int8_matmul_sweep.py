"""Times XLA's matmul of a few rows by int8 weights in both kernel layouts, (in, out) and (out, in) (the
contraction axis contiguous: `quantize.matmul`'s form), beside bf16 weights in both, on the vicuna-7b decoder's
shapes.

  python benchmarks/int8_matmul_sweep.py [--rows 4]       # on the GPU
  python benchmarks/int8_matmul_sweep.py --small          # CPU smoke test

Method: a jit applies the matmul to L distinct weights (nothing served from L2) and sums the outputs; median of
--iters calls after two warm-ups, at L = --layers and at L = --layers / 4; the figure is the difference divided by
the extra layers, so the jit's dispatch (the same in both) drops out: microseconds per matmul as a decode step
pays it. Each variant's output on the first weight is checked against the dequantised kernel's float matmul.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode_attention_sweep import marginal
from idmp_jax.models import quantize

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}


def _contract_in(x, w_out_in):  # x (rows, in) . w (out, in) over `in`.
  return jax.lax.dot_general(x, w_out_in, (((1,), (1,)), ((), ())))


# name -> (weights' dtype, stored (out, in)?, matmul(x, w, scale)).
VARIANTS = {
    "bf16 (in, out)": (jnp.bfloat16, False, lambda x, w, s: jnp.dot(x, w)),
    "bf16 (out, in)": (jnp.bfloat16, True, lambda x, w, s: _contract_in(x, w)),
    "int8 (in, out)": (jnp.int8, False, lambda x, q, s: jnp.dot(x, q.astype(x.dtype)) * s.astype(x.dtype)),
    "int8 (out, in), quantize.matmul": (jnp.int8, True, lambda x, q, s: quantize.matmul(x, q, s, x.dtype)),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="4", help="comma-separated row counts")
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--iters", type=int, default=40)
  p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
  p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  args = p.parse_args(argv)
  shapes = {"small": (256, 128)} if args.small else {s: SHAPES[s] for s in args.shapes.split(",")}
  many = 4 if args.small else args.layers
  few = max(1, many // 4)
  rng = np.random.default_rng(0)
  print(f"devices: {jax.devices()}; per-matmul time = (t[{many} weights] - t[{few}]) / {many - few}")
  for shape_name, (k, n) in shapes.items():
    w0 = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    q0, s0 = quantize.quantize_kernel(w0)  # (out, in) int8: the checked weight; the rest are random bytes.
    s = jnp.asarray(s0)
    stored = {(jnp.int8, True): [jnp.asarray(q0)], (jnp.bfloat16, False): [jnp.asarray(w0, jnp.bfloat16)]}
    for i in range(1, many):
      stored[(jnp.int8, True)].append(jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)))
      stored[(jnp.bfloat16, False)].append(jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16))
    stored[(jnp.int8, False)] = [w.T.copy() for w in stored[(jnp.int8, True)]]
    stored[(jnp.bfloat16, True)] = [w.T.copy() for w in stored[(jnp.bfloat16, False)]]
    deq = np.asarray(quantize.dequantize_kernel(jnp.asarray(q0), s))
    print(f"\n{shape_name} ({k} x {n}): int8 weights {k * n / 1e6:.1f} MB")
    for rows in (int(r) for r in args.rows.split(",")):
      x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
      for name, (dtype, out_in, fn) in VARIANTS.items():
        weights = stored[(dtype, out_in)]
        run = jax.jit(lambda x, ws, fn=fn: sum(fn(x, w, s).astype(jnp.float32) for w in ws))
        got = np.asarray(run(x, weights[:1]))
        want = np.asarray(x, np.float32) @ (deq if dtype == jnp.int8 else np.asarray(weights[0], np.float32).T
                                            if out_in else np.asarray(weights[0], np.float32))
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        us = marginal(run, (x, weights[:many]), (x, weights[:few]), many - few, args.iters)
        nbytes = k * n * jnp.dtype(dtype).itemsize
        print(f"  rows {rows:3d}  {name:34s} {us:7.1f} us  {nbytes / us / 1e6:5.2f} TB/s  rel err {err:.1e}"
              + ("  MISMATCH" if err > 2e-2 else ""), flush=True)


if __name__ == "__main__":
  main()

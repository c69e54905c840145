"""The transformer blocks' residual add + LayerNorm on the SD-2 UNet's shapes at b32, 512 px: XLA's path against
`pallas_norm`'s kernels, alone (issue 5). Per shape (rows, C):

  forward   (x, delta) -> (h = x + delta, y = LayerNorm(h)) and without the add (x -> y)
  backward  (h, dy, dh) -> dh + LN'(h)^T dy

  python benchmarks/norm_kernels_probe.py            # on the GPU
  python benchmarks/norm_kernels_probe.py --small    # CPU smoke test (kernels interpreted, tiny shapes)

Each row gives the bytes the pass must move at least (its inputs read and outputs written once) as GB/s of the time.
Each timing is a jit over --buffers distinct inputs, so the time is the kernels', not the dispatch's.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_attention_sweep import timed  # noqa: E402
# (rows, C) of the transformer blocks' streams at b32, which the adapters read too.
from benchmarks.lora_kernels_probe import SHAPES  # noqa: E402
from idmp_jax.models import layers, pallas_norm  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--configs", type=lambda t: tuple(int(v) for v in t.split(",")), nargs="*",
                 default=[(2048, 4), (4096, 4), (4096, 8), (8192, 8)],
                 help="Pallas (tile elements, num_warps) pairs, each as 'T,W'")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  shapes = ((64, 320), (32, 80)) if args.small else SHAPES
  interpret = args.small
  arr = lambda rows, c: jnp.asarray(rng.standard_normal((rows, c)), jnp.bfloat16)
  print(f"{'rows x C':>14s} {'pass':9s} {'impl':14s} {'us':>9s} {'GB/s':>7s}")
  for rows, c in shapes:
    scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.bfloat16) for _ in range(2))
    xs = [(arr(rows, c), arr(rows, c)) for _ in range(args.buffers)]
    mb = rows * c * 2 / 1e9

    def row(name, impl, fn, inputs, passes):
      try:
        us = timed(jax.jit(fn), (inputs,), args.buffers, args.iters)
        print(f"{rows:>7d} x {c:<5d} {name:9s} {impl:14s} {us:9.1f} {passes * mb / (us * 1e-6):7.0f}", flush=True)
      except Exception as e:  # A tiling Triton does not compile: say so and go on.
        print(f"{rows:>7d} x {c:<5d} {name:9s} {impl:14s} failed: {type(e).__name__}: {str(e)[:150]}", flush=True)

    def xla(fn):
      def run(*a):
        layers.NORM_KERNELS = "xla"  # Read while tracing, inside the jit below.
        try:
          return fn(*a)
        finally:
          layers.NORM_KERNELS = "auto"
      return run

    fwd = lambda xs: [layers.residual_layer_norm(x, d, scale, bias, 1e-5) for x, d in xs]
    fwd1 = lambda xs: [layers.residual_layer_norm(x, None, scale, bias, 1e-5)[1] for x, _ in xs]
    row("fwd+add", "xla", xla(fwd), xs, 4)
    row("fwd", "xla", xla(fwd1), xs, 2)
    stats = [pallas_norm.forward(x, None, scale, bias, eps=1e-5, interpret=interpret)[2:] for x, _ in xs]
    bwd_in = [(x, d, arr(rows, c), m, r) for (x, d), (m, r) in zip(xs, stats)]

    def xla_bwd(ins):
      res = lambda h, m, r: (h.reshape(rows, c), scale, bias, m.reshape(rows, 1), r.reshape(rows, 1))
      return [layers._normalize_bwd((1,), 1e-5, False, h.dtype, res(h, m, r), dy)[0] + dh for h, dy, dh, m, r in ins]

    row("bwd", "xla", xla_bwd, bwd_in, 4)
    for tile, warps in args.configs:
      kw = dict(interpret=interpret, num_warps=warps, tile=tile)
      name = f"pallas {tile},{warps}"
      row("fwd+add", name,
          lambda xs: [pallas_norm.forward(x, d, scale, bias, eps=1e-5, **kw) for x, d in xs], xs, 4)
      row("fwd", name,
          lambda xs: [pallas_norm.forward(x, None, scale, bias, eps=1e-5, **kw)[1] for x, _ in xs], xs, 2)
      row("bwd", name,
          lambda ins: [pallas_norm.backward(h, dy, dh, m, r, scale, **kw) for h, dy, dh, m, r in ins], bwd_in, 4)


if __name__ == "__main__":
  main()

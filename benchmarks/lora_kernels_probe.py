"""The LoRA adapters' input side on the SD-2 UNet's shapes at b32, 512 px: XLA's path against `pallas_lora`'s
kernels, alone (issue 5). Per shape and adapter count n (3: self-attention's q/k/v on one input; 1: to_out, the
cross-attention's to_q):

  forward   [x | h_1..h_n], h_i = s_i * dropout_i(x) A_i: XLA (n masked copies of x, n rank-16 GEMMs, one
            concatenation) against `pallas_lora.down` (one read of x, one write), per --configs tiling
  backward  dA_i = dropout_i(x)^T dh_i: XLA (the mask recomputed, n GEMMs) against `pallas_lora.down_grad`
  dx        sum_i dxh_i[:, :K] + dropout_i(dh_i A_i^T): XLA (dh_i A_i^T written at full width, then masked and
            added) against `pallas_lora.up_grad`

  python benchmarks/lora_kernels_probe.py            # on the GPU
  python benchmarks/lora_kernels_probe.py --small    # CPU smoke test (kernels interpreted, tiny shapes)

Each row also gives the bytes XLA's forward must move at least (x read, [x | h] written) as GB/s of the time.
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
from idmp_jax.models import lora, pallas_lora  # noqa: E402

# (rows, K) of the adapted inputs at b32: the four levels' tokens x 32 and their channels.
SHAPES = ((131072, 320), (32768, 640), (8192, 1280), (2048, 1280))


def config_tuple(text: str) -> tuple[int, int]:
  warps, stages = (int(v) for v in text.split(","))
  return warps, stages


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--levels", type=int, default=len(SHAPES), help="only the first N shapes (largest first)")
  p.add_argument("--configs", type=config_tuple, nargs="*", default=[(0, 2), (4, 2), (8, 2)],
                 help="Pallas (num_warps, num_stages) pairs, each as 'W,S' (W = 0: the kernels' own choice)")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  shapes = ((256, 128), (128, 192)) if args.small else SHAPES[:args.levels]
  interpret = args.small
  r = 16
  print(f"{'rows x K':>14s} {'n':>2s} {'pass':8s} {'impl':14s} {'us':>9s} {'GB/s':>7s}")
  for rows, k in shapes:
    for n in (3, 1):
      xs = [jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16) for _ in range(args.buffers)]
      a = tuple(jnp.asarray(rng.standard_normal((k, r)) / r, jnp.bfloat16) for _ in range(n))
      rates = tuple(jnp.float32(0.05) for _ in range(n))
      seeds = tuple(jnp.asarray([i + 1, 7], jnp.uint32) for i in range(n))
      scales = tuple(jnp.float32(1.0) for _ in range(n))
      dh = jnp.asarray(rng.standard_normal((n, rows, r)), jnp.bfloat16)
      floor_gb = (rows * k * 2 + rows * (k + n * r) * 2) / 1e9

      def xla_fwd(xs):
        return [jnp.concatenate([x] + [jnp.dot(lora._apply_dropout(x, rates[i], seeds[i]), a[i]) * scales[i].astype(
            x.dtype) for i in range(n)], axis=1) for x in xs]

      def xla_bwd(xs):
        return [[jnp.dot(lora._apply_dropout(x, rates[i], seeds[i]).T, dh[i], preferred_element_type=jnp.float32)
                 for i in range(n)] for x in xs]

      def row(name, impl, fn, inputs, check=None):
        try:
          us = timed(jax.jit(fn), (inputs,), args.buffers, args.iters)
          if check is not None:
            check()
          gbs = floor_gb / (us * 1e-6) if name == "forward" else float("nan")
          print(f"{rows:>7d} x {k:<5d} {n:>2d} {name:8s} {impl:14s} {us:9.1f} {gbs:7.0f}", flush=True)
        except Exception as e:  # A tiling Triton does not compile: say so and go on.
          print(f"{rows:>7d} x {k:<5d} {n:>2d} {name:8s} {impl:14s} failed: {type(e).__name__}: {str(e)[:150]}",
                flush=True)

      row("forward", "xla", xla_fwd, xs)
      xhs = xla_fwd(xs)
      for warps, stages in args.configs:
        kw = dict(interpret=interpret, num_warps=warps or None, num_stages=stages)

        def check_fwd():
          got = pallas_lora.down(xs[0], jnp.stack(a), rates, seeds, scales, **kw)
          want = xhs[0]
          err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
          if not err <= 0.05 * float(jnp.max(jnp.abs(want[:, k:].astype(jnp.float32)))):
            raise AssertionError(f"forward differs from XLA's by {err}")
        row("forward", f"pallas {warps},{stages}",
            lambda xs: [pallas_lora.down(x, jnp.stack(a), rates, seeds, scales, **kw) for x in xs], xs, check_fwd)
      dxhs_many = [tuple(jnp.asarray(rng.standard_normal((rows, k + r)), jnp.bfloat16) for _ in range(n))
                   for _ in range(args.buffers)]

      def xla_dx(dxhs_many):
        out = []
        for dxhs in dxhs_many:
          total = None
          for i in range(n):
            back = jnp.dot(dxhs[i][:, k:] * scales[i].astype(jnp.bfloat16), a[i].T)
            term = dxhs[i][:, :k] + lora._apply_dropout(back, rates[i], seeds[i])
            total = term if total is None else total + term
          out.append(total)
        return out

      row("dx", "xla", xla_dx, dxhs_many)
      for warps, stages in args.configs:
        kw = dict(interpret=interpret, num_warps=warps or 4, num_stages=stages)
        row("dx", f"pallas {warps},{stages}", lambda dxhs_many: [
            pallas_lora.up_grad(dxhs, jnp.stack(a), rates, seeds, scales, k=k, **kw) for dxhs in dxhs_many], dxhs_many)
      row("backward", "xla", xla_bwd, xs)
      for warps, stages in args.configs:
        kw = dict(interpret=interpret, num_warps=warps or 4, num_stages=stages)
        row("backward", f"pallas {warps},{stages}",
            lambda xhs: [pallas_lora.down_grad(xh, dh, rates, seeds, k=k, **kw) for xh in xhs], xhs)


if __name__ == "__main__":
  main()

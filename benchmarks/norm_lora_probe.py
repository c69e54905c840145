"""The transformer block's LayerNorm fused with the LoRA adapters that read its output (`pallas_lora.norm_down`,
`norm_up_grad`) against the unfused kernels, on the SD-2 UNet's shapes at b32, 512 px (issue 5). Per level where the
adapters' kernels run and per case (q/k/v after norm1, no add; q after norm2, with the residual add):

  forward   unfused: `pallas_norm.forward` then `pallas_lora.down`; fused: `norm_down`, per --tilings
  backward  unfused: `up_grad` (q/k/v) or XLA's dx (q) then `pallas_norm.backward`; fused: `norm_up_grad`

Medians of --rounds interleaved rounds, each a jit over --buffers distinct inputs (the kernels' time, not the
dispatch's), and the fused outputs' largest difference from the unfused ones.

  python benchmarks/norm_lora_probe.py            # on the GPU
  python benchmarks/norm_lora_probe.py --small    # CPU smoke test (kernels interpreted, tiny shapes)
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
from idmp_jax.models import lora, pallas_lora, pallas_norm  # noqa: E402

SHAPES = ((131072, 320), (32768, 640))  # (rows, K) at b32 where `lora` takes the kernels: the 64x64 and 32x32 levels.


def tiling(text: str) -> tuple[int, int]:
  rows, warps = (int(v) for v in text.split(","))
  return rows, warps


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true")
  p.add_argument("--buffers", type=int, default=4)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tilings", type=tiling, nargs="*", default=[(16, 0), (16, 2), (32, 4), (32, 8)],
                 help="fused kernels' (block rows, warps) pairs as 'R,W' (W = 0: the kernels' own choice)")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  shapes = ((128, 128),) if args.small else SHAPES
  interpret, r, eps = args.small, 16, 1e-5
  print(f"{'rows x K':>14s} {'case':5s} {'pass':8s} {'impl':12s} {'us':>9s}")
  for rows, k in shapes:
    for n, with_delta in ((3, False), (1, True)):
      case = "qkv" if n == 3 else "q+add"
      bf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
      xs = [bf(rows, k) for _ in range(args.buffers)]
      deltas = [bf(rows, k) if with_delta else None for _ in range(args.buffers)]
      ln_scale = jnp.asarray(1.0 + 0.1 * rng.standard_normal(k), jnp.float32)
      ln_bias = jnp.asarray(0.1 * rng.standard_normal(k), jnp.float32)
      a = jnp.asarray(rng.standard_normal((n, k, r)) / r, jnp.bfloat16)
      rates = tuple(jnp.float32(0.05) for _ in range(n))
      seeds = tuple(jnp.asarray([i + 1, 7], jnp.uint32) for i in range(n))
      scales = tuple(jnp.float32(1.0) for _ in range(n))
      dxhs = [tuple(bf(rows, k + r) for _ in range(n)) for _ in range(args.buffers)]
      dstreams = [bf(rows, k) for _ in range(args.buffers)]

      def unfused_fwd(inputs):
        outs = []
        for x, d in zip(*inputs):
          h, y, mean, rstd = pallas_norm.forward(x, d, ln_scale, ln_bias, eps=eps, interpret=interpret)
          outs.append((h, pallas_lora.down(y, a, rates, seeds, scales, interpret=interpret), mean, rstd))
        return outs

      def fused_fwd(inputs, tile):
        return [pallas_lora.norm_down(x, d, ln_scale, ln_bias, a, rates, seeds, scales, eps=eps, interpret=interpret,
                                      block_rows=tile[0], num_warps=tile[1] or None) for x, d in zip(*inputs)]

      fwd_out = unfused_fwd((xs, deltas))
      streams = [x if o[0] is None else o[0] for x, o in zip(xs, fwd_out)]

      def unfused_bwd(inputs):
        outs = []
        for dxh, ds, h, o in zip(*inputs, fwd_out):
          if n > 1:
            dy = pallas_lora.up_grad(dxh, a, rates, seeds, scales, k=k, interpret=interpret)
          else:
            dy = dxh[0][:, :k] + lora._apply_dropout(jnp.dot(dxh[0][:, k:] * scales[0].astype(jnp.bfloat16), a[0].T),
                                                     rates[0], seeds[0])
          outs.append(pallas_norm.backward(h, dy, ds, o[2], o[3], ln_scale, interpret=interpret))
        return outs

      def fused_bwd(inputs, tile):
        return [pallas_lora.norm_up_grad(dxh, a, rates, seeds, scales, h, ds, o[2], o[3], ln_scale, k=k,
                                         interpret=interpret, block_rows=tile[0], num_warps=tile[1] or None)
                for dxh, ds, h, o in zip(*inputs, fwd_out)]

      bwd_want = unfused_bwd((dxhs, dstreams, streams))
      fwd_in, bwd_in = (xs, deltas), (dxhs, dstreams, streams)
      cells = {("forward", "unfused"): (jax.jit(unfused_fwd), fwd_in),
               ("backward", "unfused"): (jax.jit(unfused_bwd), bwd_in)}
      for tile in args.tilings:
        label = f"fused {tile[0]},{tile[1]}"
        try:
          got_f = fused_fwd(fwd_in, tile)[0]
          got_b = fused_bwd(bwd_in, tile)[0]
        except Exception as e:  # A tiling Triton does not compile: say so and go on.
          print(f"{rows:>7d} x {k:<5d} {case:5s} {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
          continue
        errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                for g, w in ((got_f[1], fwd_out[0][1]), (got_b, bwd_want[0]))]
        print(f"{rows:>7d} x {k:<5d} {case:5s} {label}: max |diff| xh {errs[0]:.3g}, dx {errs[1]:.3g}", flush=True)
        cells[("forward", label)] = (jax.jit(lambda i, t=tile: fused_fwd(i, t)), fwd_in)
        cells[("backward", label)] = (jax.jit(lambda i, t=tile: fused_bwd(i, t)), bwd_in)
      times = {key: [] for key in cells}
      for _ in range(args.rounds):
        for key, (fn, inputs) in cells.items():
          times[key].append(timed(fn, (inputs,), args.buffers, args.iters))
      for (name, impl), ts in times.items():
        print(f"{rows:>7d} x {k:<5d} {case:5s} {name:8s} {impl:12s} {statistics.median(ts):9.1f}", flush=True)


if __name__ == "__main__":
  main()

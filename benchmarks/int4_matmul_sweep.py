"""Times the decode-shaped (few rows) matmul of a frozen vicuna-7b projection in each weight format and each
formulation XLA might fuse: which int4 form streams its weights at int8's rate or better.

  python benchmarks/int4_matmul_sweep.py [--rows 4]      # on the GPU
  python benchmarks/int4_matmul_sweep.py --small         # CPU smoke test

Method: one jit applies the matmul to --layers distinct weights (nothing served from L2) and sums the outputs;
median of --iters calls after two warm-ups, divided by the layers. Each formulation's output is checked against
the dequantised kernel's float matmul before it is reported.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode_attention_sweep import timed  # Microseconds per call / its kernel count.
from idmp_jax.models import quantize

SHAPES = {"gate/up": (4096, 11008), "down": (11008, 4096), "q/k/v/o": (4096, 4096)}


def _per_column(x, q, s):
  return jnp.dot(x, q.astype(x.dtype)) * s.astype(x.dtype)


def _grouped_partials(partial_dtype):
  """One dot per group (a batch dimension), scaled and summed after: the scale stays out of the GEMM operand."""
  def fn(x, q, s):
    g = s.shape[0]
    k, n = q.shape
    xg = x.reshape(x.shape[0], g, k // g)
    parts = jnp.einsum("bgr,grn->bgn", xg, q.reshape(g, k // g, n).astype(x.dtype),
                       preferred_element_type=partial_dtype)
    return jnp.sum(parts.astype(jnp.float32) * s[None], axis=1).astype(x.dtype)
  return fn


def _pack_nibbles(q):
  """int4 (K, N) -> int8 (K/2, N): row 2i in the low nibble, row 2i+1 in the high one."""
  q = np.asarray(q, np.int8)
  return ((q[0::2] & 0xF) | (q[1::2] << 4)).astype(np.int8)


def _nibbles(x, p, s):
  """Packed int8 nibbles unpacked by shifts as the dot's operand (sign-extending arithmetic shifts)."""
  lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
  hi = jnp.right_shift(p, 4)
  w = jnp.concatenate([lo, hi], axis=0).astype(x.dtype)
  xs = jnp.concatenate([x[:, 0::2], x[:, 1::2]], axis=1)
  return jnp.dot(xs, w) * s.astype(x.dtype)


def formulations():
  """name -> (bits, group, matmul(x, q, scale))"""
  return {
      "bf16": (16, 0, lambda x, w, s: jnp.dot(x, w)),
      "int8 per-column": (8, 0, _per_column),
      "int4 per-column": (4, 0, _per_column),
      "int4 nibbles per-column": (-4, 0, _nibbles),
      "int4 g64 (library)": (4, 64, lambda x, q, s: quantize.matmul(x, q, s, x.dtype)),
      "int4 g64 partials f32": (4, 64, _grouped_partials(jnp.float32)),
      "int4 g64 partials bf16": (4, 64, _grouped_partials(jnp.bfloat16)),
      "int4 g128 partials f32": (4, 128, _grouped_partials(jnp.float32)),
      "int4 g128 partials bf16": (4, 128, _grouped_partials(jnp.bfloat16)),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  args = p.parse_args(argv)
  shapes = {"small": (256, 384)} if args.small else SHAPES
  layers = 2 if args.small else args.layers
  rng = np.random.default_rng(0)
  print(f"devices: {jax.devices()}; rows {args.rows}, {layers} distinct weights per call")
  for shape_name, (k, n) in shapes.items():
    w = [rng.standard_normal((k, n)).astype(np.float32) * 0.02 for _ in range(layers)]
    x = jnp.asarray(rng.standard_normal((args.rows, k)), jnp.bfloat16)
    print(f"\n{shape_name} ({k} x {n}): bf16 weights {k * n * 2 / 1e6:.1f} MB")
    for name, (bits, group, matmul) in formulations().items():
      if bits == 16:
        qs = [(jnp.asarray(wi, jnp.bfloat16), jnp.ones((n,), jnp.float32)) for wi in w]
        ref = [np.asarray(wi, np.float32) for wi in w]
      else:
        packed = [quantize.quantize_kernel(wi, abs(bits), group) for wi in w]
        qs = [(jnp.asarray(_pack_nibbles(q) if bits < 0 else q), jnp.asarray(s)) for q, s in packed]
        ref = [np.asarray(quantize.dequantize_kernel(jnp.asarray(q), jnp.asarray(s))) for q, s in packed]

      @jax.jit
      def run(x, qs, matmul=matmul):
        return sum(matmul(x, q, s).astype(jnp.float32) for q, s in qs)

      try:
        out = np.asarray(run(x, qs))
      except Exception as e:  # A formulation a backend cannot compile is reported, not fatal.
        print(f"  {name:26s} failed: {type(e).__name__}: {str(e)[:120]}")
        continue
      want = sum(np.asarray(x, np.float32) @ r for r in ref)
      err = float(np.max(np.abs(out - want)) / (np.max(np.abs(want)) + 1e-12))
      us = timed(run, (x, qs), layers, args.iters)
      weight_bytes = k * n * abs(bits) / 8
      print(f"  {name:26s} {us:8.1f} us  {weight_bytes / us / 1e3:7.0f} GB/s of weights  rel err {err:.1e}"
            + ("  MISMATCH" if err > 2e-2 else ""))


if __name__ == "__main__":
  main()

"""Is the LoRA dropout glue bound by its bytes or by its mask's hash? Times, on one SD-2 UNet adapter input at
64x64 latents (b32: 131072 x 320 bf16), the pieces of `lora._lora_matmuls`'s forward glue beside a plain copy and
beside the hash alone (issue 5: the adapters' glue is ~17 ms of the b32 step; BENCHMARKS.md).

  python benchmarks/lora_dropout_sweep.py            # on the GPU
  python benchmarks/lora_dropout_sweep.py --small    # CPU smoke test

Variants (each one jit over --buffers distinct inputs, so the figure is per adapter and L2 holds none of them):
  copy              x * c: one read and one write of x, no hash (the bytes' floor)
  hash only         the keep mask's count over x's index space: the hash with no memory traffic
  dropout           lora._apply_dropout(x): the read, the write and the hash (two lowbias32 rounds)
  dropout, 1 round  the same mask construction with one lowbias32 round (a cheaper mask, not the library's)
  forward glue      [x | scale * dropout(x) A] as lora's forward builds it before the base GEMM
TB/s: the least traffic the variant needs (x read once, its output written once) over its time; near the copy's
means byte-bound, far below it with "hash only" close to the time means hash-bound.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode_attention_sweep import timed
from idmp_jax.models import lora


def _one_round_dropout(x, rate, seed):
  index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
  bits = lora._lowbias32(index * jnp.uint32(0x9E3779B9) ^ seed[0] ^ (seed[1] << 7)) >> 16
  cut = jnp.round(rate * 65536.0)
  keep = bits.astype(jnp.int32) >= cut.astype(jnp.int32)
  return jnp.where(keep, x * (65536.0 / (65536.0 - cut)).astype(x.dtype), jnp.zeros((), x.dtype))


def _hash_only(x, rate, seed):
  # The library's dropout of a constant of x's shape, summed: XLA fuses it into one reduction reading nothing.
  return jnp.sum(lora._apply_dropout(jnp.ones(x.shape, x.dtype), rate, seed), dtype=jnp.float32)


def _forward_glue(x, a, rate, seed, scale):
  h = jnp.dot(lora._apply_dropout(x, rate, seed), a) * scale.astype(x.dtype)
  return jnp.concatenate([x, h], axis=1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=32 * 4096)
  p.add_argument("--features", type=int, default=320)
  p.add_argument("--buffers", type=int, default=8)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  args = p.parse_args(argv)
  rows, k = (1024, 64) if args.small else (args.rows, args.features)
  n = 2 if args.small else args.buffers
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16) for _ in range(n)]
  a = jnp.asarray(rng.standard_normal((k, 16)) / 16, jnp.bfloat16)
  rate, seed, scale = jnp.float32(0.05), jnp.asarray([12345, 678], jnp.uint32), jnp.float32(1.0)
  variants = {
      "copy": lambda x: x * jnp.asarray(1.5, x.dtype),
      "hash only": lambda x: _hash_only(x, rate, seed),
      "dropout": lambda x: lora._apply_dropout(x, rate, seed),
      "dropout, 1 round": lambda x: _one_round_dropout(x, rate, seed),
      "forward glue": lambda x: _forward_glue(x, a, rate, seed, scale),
  }
  nbytes = rows * k * 2
  print(f"devices: {jax.devices()}; x ({rows}, {k}) bf16 = {nbytes / 1e6:.1f} MB, {n} distinct inputs per call")
  for name, fn in variants.items():
    run = jax.jit(lambda xs, fn=fn: [fn(x) for x in xs])
    kept = float(np.mean(np.asarray(lora._apply_dropout(xs[0], rate, seed)) != 0)) if name == "dropout" else None
    us = timed(run, (xs,), n, args.iters)
    moved = {"copy": 2, "hash only": 0, "dropout": 2, "dropout, 1 round": 2, "forward glue": 2}[name] * nbytes
    rate_s = f"{moved / us / 1e6:5.2f} TB/s of x's bytes" if moved else f"{rows * k / us / 1e6:5.2f} G elements/ms"
    print(f"  {name:18s} {us:8.1f} us   {rate_s}" + (f"   (kept {kept:.3f})" if kept is not None else ""),
          flush=True)


if __name__ == "__main__":
  main()

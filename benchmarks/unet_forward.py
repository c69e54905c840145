"""UNet forward throughput at the SD-2 inpainting shape (random weights), RCA off and on, as BENCHMARKS.md reports.

  python benchmarks/unet_forward.py [--batches 8,16] [--impls cudnn,xla] [--torch] [--out results.json]
  python benchmarks/unet_forward.py --small      # CPU smoke test of the script itself

Method (device README METHOD.md): bf16 weights and compute, 64x64x9 latents (512 px), 77x1024 context; RCA with
5 masks (6 regions) at 512x512 layout; warm-up calls, then the median of N timed calls with block_until_ready,
alternating two input sets. FLOPs per image from BASELINES.md (804 GFLOP, torch flop counter).
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

from idmp_jax.models import unet
from idmp_jax.tasks.unet_forward import random_regions
from idmp_jax.train import tiny

GFLOP_PER_IMAGE = 804.0


def time_fn(fn, args_list, warmup: int, iters: int) -> list[float]:
  for i in range(warmup):
    jax.block_until_ready(fn(*args_list[i % len(args_list)]))
  times = []
  for i in range(iters):
    args = args_list[i % len(args_list)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def make_inputs(rng, config, batch, size, seq, rca: bool):
  sample = jnp.asarray(rng.standard_normal((batch, size, size, config.in_channels), np.float32), jnp.bfloat16)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  ctx = jnp.asarray(rng.standard_normal((batch, seq, config.cross_attention_dim), np.float32), jnp.bfloat16)
  if not rca:
    return (sample, t, ctx)
  rm, tr = random_regions(rng, batch, size * 8, num_masks=5, max_concepts=5, seq=seq)
  return (sample, t, ctx, jnp.asarray(rm), jnp.asarray(tr))


def bench_jax(args, config, params, results):
  rng = np.random.default_rng(0)
  for impl in args.impls:
    model = unet.UNet2DConditionModel(config, dtype=jnp.bfloat16, attention_impl=impl)
    fwd = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
    for batch in args.batches:
      for rca in (False, True):
        inputs = [make_inputs(rng, config, batch, args.size, 77, rca) for _ in range(2)]
        try:
          times = time_fn(lambda *x: fwd(params, *x), inputs, args.warmup, args.iters)
        except Exception as e:  # Report and go on (e.g. an implementation the backend lacks).
          print(f"jax {impl} b{batch} rca={rca}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
          continue
        med = statistics.median(times)
        row = dict(framework="jax", impl=impl, batch=batch, rca=rca, median_s=med, img_s=batch / med,
                   tflops=GFLOP_PER_IMAGE * batch / med / 1e3, spread=(min(times), max(times)))
        results.append(row)
        print(f"jax   {impl:5s} b{batch:<3d} rca={'on ' if rca else 'off'}: {med * 1e3:8.2f} ms  "
              f"{row['img_s']:7.1f} img/s  {row['tflops']:6.1f} TFLOP/s", flush=True)


def check_impls(config, params, size):
  """cuDNN and XLA attention paths agree (bf16 tolerance) with RCA on: the fast path computes the same thing."""
  rng = np.random.default_rng(1)
  x = make_inputs(rng, config, 2, size, 77, True)
  outs = {}
  for impl in ("xla", "cudnn"):
    model = unet.UNet2DConditionModel(config, dtype=jnp.bfloat16, attention_impl=impl)
    outs[impl] = np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *x), np.float64)
  err = np.linalg.norm(outs["cudnn"] - outs["xla"]) / np.linalg.norm(outs["xla"])
  print(f"check: RCA forward, cuDNN vs XLA attention, relative error {err:.2e} (bf16)", flush=True)
  return float(err)


def bench_torch(args, results):
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet
  cfg = {k: v for k, v in unet.UNetConfig().to_dict().items() if not k.startswith("_")}
  model = TorchUNet(**cfg).to("cuda", torch.bfloat16).eval()
  for batch in args.batches:
    sample = torch.randn(batch, 9, args.size, args.size, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device="cuda")
    ctx = torch.randn(batch, 77, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
      for _ in range(args.warmup):
        model(sample, t, ctx)
      torch.cuda.synchronize()
      times = []
      for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(sample, t, ctx)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    med = statistics.median(times)
    results.append(dict(framework="torch", impl="sdpa", batch=batch, rca=False, median_s=med, img_s=batch / med,
                        tflops=GFLOP_PER_IMAGE * batch / med / 1e3))
    print(f"torch sdpa  b{batch:<3d} rca=off: {med * 1e3:8.2f} ms  {batch / med:7.1f} img/s", flush=True)
  del model
  torch.cuda.empty_cache()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", default="8,16")
  p.add_argument("--impls", default="cudnn,xla")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--torch", action="store_true", help="also time diffusers' PyTorch UNet (SDPA) in this run")
  p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
  p.add_argument("--out", default="")
  args = p.parse_args()
  args.batches = [int(b) for b in args.batches.split(",")]
  args.impls = args.impls.split(",")
  if args.small:
    config = unet.UNetConfig(block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=64,
                             norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=(1, 1))
    args.size, args.batches, args.impls, args.iters, args.warmup = 8, [2], ["xla"], 3, 1
  else:
    config = unet.UNetConfig()
  print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
  # Random weights drawn with NumPy on the host: the jitted init of the full UNet compiled for over 100 s on the
  # H200 (2026-12-02). Inference weights in bf16, as the baseline.
  params = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                       tiny.random_params(unet.abstract_params(config), 0)))
  results, extra = [], {}
  if jax.default_backend() == "gpu" and "cudnn" in args.impls:
    extra["cudnn_vs_xla_rel_err"] = check_impls(config, params, args.size)
  bench_jax(args, config, params, results)
  if args.torch:
    del params
    try:
      bench_torch(args, results)
    except Exception as e:
      print(f"torch baseline FAILED: {type(e).__name__}: {e}", flush=True)
  summary = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results, **extra,
                 date=time.strftime("%Y-%m-%d"))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()

"""A forward pass of the RCA UNet on random inputs, RCA on and off: the smallest end-to-end job.

It shows the pieces the real jobs use (config -> model -> params sharded over the mesh -> jitted step on a
sharded batch) and prints what it did; with `config.unet.pretrained` it loads a stock diffusers folder.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idmp_jax import parallel
from idmp_jax.models import unet


def random_regions(rng: np.random.Generator, batch: int, size: int, num_masks: int, max_concepts: int, seq: int = 77):
  """Rectangular masks packed like the dataset's RCA inputs (SPEC §2.9): region 0 everywhere, region i = mask i
  plus every pixel outside all masks, zero padding up to max_concepts + 1; tokens split evenly over prompts."""
  region_masks = np.zeros((batch, max_concepts + 1, size, size), np.float32)
  token_region = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    masks = np.zeros((num_masks, size, size), np.float32)
    for i in range(num_masks):
      y, x = rng.integers(0, size // 2, size=2)
      masks[i, y:y + size // 3, x:x + size // 3] = 1
    outside = masks.max(0) == 0
    region_masks[b, 0] = 1
    region_masks[b, 1:num_masks + 1] = np.maximum(masks, outside)
    per = (seq - 2) // (2 * num_masks)  # Prompts fill half the context; the rest is EOS/padding.
    for i in range(num_masks):
      token_region[b, 1 + i * per:1 + (i + 1) * per] = i + 1
  return region_masks, token_region


def run(config, workdir: str, mesh) -> dict:
  dtype = jnp.dtype(config.dtype)
  if config.unet.pretrained:
    ucfg, params = unet.load_pretrained(config.unet.pretrained)
    source = config.unet.pretrained
  else:
    ucfg = unet.UNetConfig.from_dict(config.unet.tiny.to_dict(), source="config.unet.tiny")
    params = unet.init_params(ucfg, jax.random.key(config.seed), size=8, seq=4)
    source = "tiny random UNet"
  params = jax.device_put(params, parallel.param_shardings(params, mesh))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  local_batch = parallel.batch_size_per_process(config.batch_size, mesh)
  latent = config.resolution // 8
  rng = np.random.default_rng(config.seed + jax.process_index())
  region_masks, token_region = random_regions(rng, local_batch, config.resolution, config.num_masks,
                                              config.max_concepts)
  batch = parallel.shard_batch(dict(
      sample=rng.standard_normal((local_batch, latent, latent, ucfg.in_channels), np.float32),
      timesteps=rng.integers(0, 1000, local_batch).astype(np.int32),
      context=rng.standard_normal((local_batch, 77, ucfg.cross_attention_dim), np.float32),
      region_masks=region_masks, token_region=token_region), mesh)

  model = unet.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl=config.attention)

  @functools.partial(jax.jit, static_argnames="rca")
  def forward(params, batch, rca: bool):
    extra = dict(region_masks=batch["region_masks"], token_region=batch["token_region"]) if rca else {}
    return model.apply({"params": params}, batch["sample"], batch["timesteps"], batch["context"], **extra)

  results = {}
  for rca in (True, False):
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(params, batch, rca=rca))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(params, batch, rca=rca))
    results["rca_on" if rca else "rca_off"] = dict(out=out, first_call_s=compile_s,
                                                   step_s=time.perf_counter() - t0)
  diff = float(jnp.abs(results["rca_on"]["out"] - results["rca_off"]["out"]).mean())
  summary = dict(
      model=source, params=n_params, mesh=dict(mesh.shape), batch=config.batch_size, dtype=str(dtype),
      latents=[latent, latent, ucfg.in_channels], output_shape=list(results["rca_on"]["out"].shape),
      output_sharded_over=len(results["rca_on"]["out"].sharding.device_set),
      mean_abs_output=float(jnp.abs(results["rca_on"]["out"]).mean()),
      mean_abs_diff_rca_on_vs_off=diff,
      seconds={k: dict(first_call=round(v["first_call_s"], 3), step=round(v["step_s"], 4))
               for k, v in results.items()})
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "unet_forward.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(f"UNet forward ({source}, {n_params:,} params) on mesh {dict(mesh.shape)}: batch {config.batch_size} of "
          f"{latent}x{latent}x{ucfg.in_channels} latents, {config.num_masks} masks/example, dtype {dtype}")
    for k, v in summary["seconds"].items():
      print(f"  {k}: first call (compile) {v['first_call']} s, then {v['step']} s")
    print(f"  output {summary['output_shape']} over {summary['output_sharded_over']} device(s); "
          f"mean |RCA on - RCA off| = {diff:.4f} (regional attention changes the result)")
    print(f"  summary written to {os.path.join(workdir, 'unet_forward.json')}")
  logging.info("unet_forward: %s", summary)
  return summary

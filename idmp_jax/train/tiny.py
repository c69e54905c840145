"""Random weights without compiling, for tests and benchmarks.

`idmp_jax.tiny.make_tiny_pipeline` (the demo's pipeline) draws its weights with a jitted `init`, which takes ~40 s
to compile on a busy 2-core CPU. `write_random_pipeline` writes the same folder layout (same tiny shapes, tokenizer,
scheduler and model_index.json, from idmp_jax.tiny) with weights drawn by NumPy from the abstract param trees, in
seconds, and takes another UNet shape if asked. `random_params` also fills full-size SD-2 trees for the benchmark.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from idmp_jax import tiny
from idmp_jax.models import clip, unet, vae


def random_params(abstract, seed: int) -> dict:
  """NumPy fp32 weights for an abstract param tree: kernels N(0, 1/fan_in), embeddings N(0, 0.02^2), norm scales
  1 + N(0, 0.1^2), everything else (biases) N(0, 0.05^2)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  out = {}
  for path in sorted(flat):
    shape, leaf = flat[path].shape, path[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    if leaf == "kernel":
      x /= np.sqrt(max(int(np.prod(shape[:-1])), 1))
    elif leaf == "embedding":
      x *= 0.02
    elif leaf == "scale":
      x = 1 + 0.1 * x
    else:
      x *= 0.05
    out[path] = x
  return traverse_util.unflatten_dict(out)


def write_random_pipeline(folder: str, seed: int = 0, unet_config: dict | None = None) -> str:
  """idmp_jax.tiny's pipeline folder with NumPy-drawn weights (`unet_config` replaces its TINY_UNET)."""
  shapes = lambda module, *args: jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  ucfg = unet.UNetConfig.from_dict(dict(unet_config or tiny.TINY_UNET), source="tiny unet")
  unet.save_pretrained(os.path.join(folder, "unet"), ucfg, random_params(unet.abstract_params(ucfg), seed))
  vcfg = vae.AutoencoderKLConfig.from_dict(dict(tiny.TINY_VAE), source="tiny vae")
  vabstract = shapes(vae.AutoencoderKL(vcfg), jnp.zeros((1, 16, 16, 3), jnp.float32))
  vae.save_vae(os.path.join(folder, "vae"), vcfg, random_params(vabstract, seed + 1))
  tcfg = tiny.tiny_text_config(ucfg.cross_attention_dim)
  tabstract = shapes(clip.CLIPTextTransformer(tcfg), jnp.zeros((1, 77), jnp.int32))
  clip.save_text_encoder(os.path.join(folder, "text_encoder"), tcfg, random_params(tabstract, seed + 2))
  tiny.write_pipeline_files(folder)
  return folder

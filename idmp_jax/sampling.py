"""Multi-mask inpainting: SD-2 inpainting with classifier-free guidance and optional RCA, as one jitted function.

The numerics follow diffusers' `StableDiffusionInpaintPipeline` (SPEC §6): strength 1 (pure noise ×
init_noise_sigma), the mask binarised at 0.5 and taken to latent resolution by torch's nearest rule, masked image =
image · (mask < 0.5) whose latents are SAMPLED from the VAE posterior, unconditional half first, the full decoded
image returned (known pixels are not pasted back). With RCA the unconditional half uses token_region 0 (every
token visible) and the same region masks (SPEC §3).

Randomness is per example: `example_key(seed, stem)` gives the initial latents and the posterior noise, so an
image does not depend on its batch position or on how work is split over processes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax import schedulers
from idmp_jax.convert.torch_format import CheckpointError
from idmp_jax.models import clip, unet, vae
from idmp_jax.models.layers import torch_nearest_indices


@dataclasses.dataclass(frozen=True)
class Models:
  """The three networks' configs (static) and params (a pytree), as read from a stock SD-2 inpainting folder."""
  unet: unet.UNetConfig
  vae: vae.AutoencoderKLConfig
  text: clip.CLIPTextConfig
  scheduler_config: dict = dataclasses.field(hash=False, compare=False)


def require_dir(path: str, what: str) -> str:
  if not path or not os.path.isdir(path):
    raise CheckpointError(f"{path or '(empty path)'}: {what} folder not found")
  return path


def load_models(model_dir: str, lora: str = "", lora_scale: float = 1.0) -> tuple[Models, dict]:
  """Reads `unet/`, `vae/`, `text_encoder/`, `scheduler/` of a stock pipeline folder (no torch). `lora`: a LoRA
  (diffusers' `pytorch_lora_weights.safetensors` or its folder) merged into the UNet at `lora_scale`."""
  require_dir(model_dir, "model")
  for sub in ("unet", "vae", "text_encoder", "scheduler"):
    require_dir(os.path.join(model_dir, sub), f"pipeline component {sub!r} of {model_dir}:")
  ucfg, uparams = unet.load_pretrained(os.path.join(model_dir, "unet"))
  vcfg, vparams = vae.load_vae(os.path.join(model_dir, "vae"))
  tcfg, tparams = clip.load_text_encoder(os.path.join(model_dir, "text_encoder"))
  if lora:
    from idmp_jax.models import lora as lora_lib
    if not os.path.exists(lora):
      raise CheckpointError(f"{lora}: LoRA checkpoint not found")
    adapted = lora_lib.load_diffusers_lora(lora, uparams, unet.LIST_NAMES)
    if lora_scale != 1.0:  # diffusers' LoRA scale multiplies alpha / r.
      adapted = jax.tree_util.tree_map_with_path(
          lambda p, x: x * lora_scale if getattr(p[-1], "key", None) == "lora_scale" else x, adapted)
    uparams = lora_lib.merge_lora(adapted)
  sched = schedulers.load_scheduler_config(os.path.join(model_dir, "scheduler"))
  if ucfg.in_channels != 4 + 1 + vcfg.latent_channels:
    raise CheckpointError(f"{model_dir}/unet/config.json: in_channels {ucfg.in_channels} is not an inpainting UNet "
                          f"(expected {4 + 1 + vcfg.latent_channels} = latents + mask + masked-image latents)")
  return Models(ucfg, vcfg, tcfg, sched), dict(unet=uparams, vae=vparams, text=tparams)


def cast_params(params, dtype):
  """Inference weights in the compute dtype, once (not on every call)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def example_key(seed: int, stem: str) -> jax.Array:
  """A key from (seed, stem), stable across runs, processes and batch layouts."""
  digest = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:4], "little")
  return jax.random.fold_in(jax.random.key(seed), digest)


def draw_noise(keys, latent_shape) -> tuple[jax.Array, jax.Array]:
  """(initial latents noise, posterior noise), each (B, *latent_shape) NHWC, from one key per example.
  Drawn flat then reshaped: a multi-dimensional normal compiles very slowly on CPU (jax 0.10)."""
  n = int(np.prod(latent_shape))
  def one(key):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (n,)).reshape(latent_shape), jax.random.normal(k2, (n,)).reshape(latent_shape))
  return jax.vmap(one)(keys)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  num_inference_steps: int = 50
  guidance_scale: float = 7.5
  scheduler: str = ""            # "" = the folder's class; else ddim | pndm | dpm++ (same betas, from_config).
  dtype: Any = jnp.float32
  attention_impl: str = "auto"


def make_sample_fn(models: Models, options: SamplerOptions, on_step: Optional[Callable[[Any], None]] = None):
  """Returns `sample(params, batch, noise, posterior_noise) -> images (B, H, W, 3) in [0, 1]`, to be jitted.

  batch: pixel_values (B, H, W, 3) in [-1, 1], mask (B, H, W, 1), input_ids (B, 77), uncond_ids (77,), and for
  RCA token_region (B, 77) and region_masks (B, R, H, W). noise / posterior_noise: (B, H/8, W/8, 4).
  Optional `guidance_scale` (a scalar) overrides `options.guidance_scale` as a traced value, so a new scale does
  not recompile (whether CFG runs at all is still fixed by `options.guidance_scale > 1`).
  `on_step(timestep)` is called on the host after each UNet call (`jax.debug.callback`): progress for an app,
  without splitting the jitted denoising loop.
  """
  sched = schedulers.from_config(models.scheduler_config, options.num_inference_steps,
                                 class_name=options.scheduler or None)
  dtype, impl = options.dtype, options.attention_impl
  unet_model = unet.UNet2DConditionModel(models.unet, dtype=dtype, attention_impl=impl)
  text_model = clip.CLIPTextTransformer(models.text, dtype=dtype, attention_impl=impl)
  sf = models.vae.scaling_factor
  guidance = options.guidance_scale
  do_cfg = guidance > 1.0

  def sample(params, batch, noise, posterior_noise):
    b, h, w, _ = batch["pixel_values"].shape
    scale = batch.get("guidance_scale")  # None: the Python float (weakly typed, so bf16 stays bf16).
    down = models.vae.downscale
    # Conditioning, as the pipeline prepares it.
    mask = (batch["mask"] >= 0.5).astype(jnp.float32)
    masked = batch["pixel_values"] * (mask < 0.5)
    mean, logvar = vae.encode(models.vae, params["vae"], masked.transpose(0, 3, 1, 2), dtype=dtype,
                              attention_impl=impl)
    masked_latents = (mean + jnp.exp(0.5 * logvar) * posterior_noise.transpose(0, 3, 1, 2)) * sf
    masked_latents = masked_latents.transpose(0, 2, 3, 1)
    rows, cols = torch_nearest_indices(h, h // down), torch_nearest_indices(w, w // down)
    mask_latent = mask[:, rows][:, :, cols]

    cond = text_model.apply({"params": params["text"]}, batch["input_ids"])[0]
    rca = {}
    if "token_region" in batch:
      rca = dict(region_masks=batch["region_masks"], token_region=batch["token_region"])
    if do_cfg:
      uncond = text_model.apply({"params": params["text"]}, batch["uncond_ids"][None])[0]
      context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
      mask_latent = jnp.concatenate([mask_latent] * 2)
      masked_latents = jnp.concatenate([masked_latents] * 2)
      if rca:
        rca = dict(region_masks=jnp.concatenate([rca["region_masks"]] * 2),
                   token_region=jnp.concatenate([jnp.zeros_like(rca["token_region"]), rca["token_region"]]))
    else:
      context = cond
    cond_channels = jnp.concatenate([mask_latent, masked_latents], axis=-1).astype(dtype)

    def model_fn(x, t):
      x = jnp.concatenate([x] * 2) if do_cfg else x
      x = jnp.concatenate([x.astype(dtype), cond_channels], axis=-1)
      out = unet_model.apply({"params": params["unet"]}, x, t, context, **rca)
      if do_cfg:
        uncond_out, cond_out = jnp.split(out, 2)
        g = guidance if scale is None else jnp.asarray(scale).astype(out.dtype)
        out = uncond_out + g * (cond_out - uncond_out)
      if on_step is not None:  # Fed a value of `out` so it fires once the step is computed, not when queued.
        jax.debug.callback(lambda t, _: on_step(t), t, out.reshape(-1)[0])
      return out

    latents = noise.astype(jnp.float32) * sched.init_noise_sigma
    latents = sched.denoise(model_fn, latents)
    images = vae.decode(models.vae, params["vae"], (latents / sf).transpose(0, 3, 1, 2), dtype=dtype,
                        attention_impl=impl)
    return jnp.clip(images.astype(jnp.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)

  return sample

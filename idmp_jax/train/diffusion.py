"""The inpainting fine-tuning step (SPEC §5): frozen VAE + text encoder + UNet with LoRA, DDPM noise, MSE.

`Models` holds the frozen modules, their configs and the DDPM schedule; `loss_fn` is one forward pass of the
original's training step; `make_train_step` / `make_eval_step` wrap it for jit. Layout: batches are NHWC like the
data pipeline (pixel_values, masked_pixel_values (B, H, W, 3) in [-1, 1]; mask (B, H, W, 1); input_ids,
token_region (B, 77); region_masks (B, R, H, W); valid (B,) = 1 for real rows, 0 for padding rows of an epoch's
partial last batch, which are left out of the mean exactly as if the batch were smaller). masked_pixel_values may
be absent (then pixel_values * (1 - mask), as the dataset computes it) and mask may be uint8; region_masks may be
the layout picked at a stride (idmp_jax.train.input.compact).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from idmp_jax import schedulers
from idmp_jax.models import clip as clip_lib, lora, unet as unet_lib, vae as vae_lib
from idmp_jax.models.layers import resize_nearest_torch
from idmp_jax.train import state as train_state
from idmp_jax.train.state import TrainState, init_state  # noqa: F401 (re-exported: the jobs' names)


@dataclasses.dataclass(frozen=True)
class Models:
  """Frozen modules and settings of the step (hashable static data; the weights travel separately)."""
  unet: unet_lib.UNet2DConditionModel
  vae: vae_lib.AutoencoderKL
  text: clip_lib.CLIPTextTransformer
  vae_config: vae_lib.AutoencoderKLConfig
  ddpm: schedulers.DDPMScheduler
  rca: bool
  prediction_type: str            # "epsilon" | "v_prediction" (the scheduler's, unless overridden)
  noise_offset: float = 0.0
  snr_gamma: float = 0.0          # 0: plain MSE
  vae_batch_chunks: int = 1       # encode the 2B images in this many sequential chunks (peak memory)


def _normal(key, shape, dtype=jnp.float32):
  # Drawn flat then reshaped: the same numbers as normal(key, shape) with partitionable threefry, and XLA:CPU
  # compiles the 1-D form much faster (see idmp_jax.models.vae.sample_latent).
  n = 1
  for s in shape:
    n *= s
  return jax.random.normal(key, (n,), dtype).reshape(shape)


def encode_latents(models: Models, vae_params, images, key):
  """VAE posterior sample x scaling factor (diffusers `latent_dist.sample() * scaling_factor`), NHWC fp32."""
  def encode(x):
    return models.vae.apply({"params": vae_params}, x, method=vae_lib.AutoencoderKL.encode).astype(jnp.float32)

  if models.vae_batch_chunks > 1:
    b = images.shape[0]
    if b % models.vae_batch_chunks:
      raise ValueError(f"vae_batch_chunks = {models.vae_batch_chunks} does not divide the {b} images to encode")
    chunks = images.reshape((models.vae_batch_chunks, b // models.vae_batch_chunks) + images.shape[1:])
    moments = jax.lax.map(encode, chunks)
    moments = moments.reshape((b,) + moments.shape[2:])
  else:
    moments = encode(images)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  latents = vae_lib.sample_latent(mean, jnp.clip(logvar, -30.0, 20.0), key)
  return latents * models.vae_config.scaling_factor


def loss_fn(trainable, frozen, batch, key, models: Models, *, train: bool):
  """The original's training loss for one batch; returns (loss, per-example loss)."""
  k_vae, k_noise, k_offset, k_t, k_dropout = jax.random.split(key, 5)
  b = batch["pixel_values"].shape[0]
  dtype = models.unet.dtype

  # Image and masked image through the VAE in one call (2B images).
  pixels, full_mask = batch["pixel_values"], batch["mask"].astype(batch["pixel_values"].dtype)
  masked = batch["masked_pixel_values"] if "masked_pixel_values" in batch else pixels * (1 - full_mask)
  images = jnp.concatenate([pixels, masked], axis=0).astype(models.vae.dtype)
  latents, masked_latents = jnp.split(encode_latents(models, frozen["vae"], images, k_vae), 2, axis=0)
  h, w = latents.shape[1:3]
  mask = resize_nearest_torch(full_mask.astype(jnp.float32), (h, w), axes=(1, 2))  # pixel [8i, 8j]

  noise = _normal(k_noise, latents.shape)
  if models.noise_offset:
    noise = noise + models.noise_offset * _normal(k_offset, (b, 1, 1, latents.shape[-1]))
  t = jax.random.randint(k_t, (b,), 0, models.ddpm.num_train_timesteps)
  noisy = models.ddpm.add_noise(latents, noise, t)
  target = (noise if models.prediction_type == "epsilon" else models.ddpm.get_velocity(latents, noise, t))

  context = models.text.apply({"params": frozen["text"]}, batch["input_ids"])[0]
  x = jnp.concatenate([noisy, mask, masked_latents], axis=-1).astype(dtype)
  rca = dict(region_masks=batch["region_masks"], token_region=batch["token_region"]) if models.rca else {}
  rngs = {lora.DROPOUT_RNG: k_dropout} if train else {}
  pred = models.unet.apply({"params": lora.merge(trainable, frozen["unet"])}, x, t, context, **rca, rngs=rngs)

  per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
  if models.snr_gamma:
    # diffusers' min-SNR-gamma weighting (Hang et al. 2023), as the original's train_text_to_image_lora.
    snr = models.ddpm.snr(t)
    weight = jnp.minimum(snr, models.snr_gamma)
    weight = weight / snr if models.prediction_type == "epsilon" else weight / (snr + 1)
    per_example = per_example * weight
  valid = batch["valid"].astype(jnp.float32)
  loss = jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return loss, per_example


def make_train_step(models: Models, optimizer: optax.GradientTransformation, schedule: Callable):
  """(state, frozen, batch) -> (state, metrics), the shared step of `idmp_jax.train.state` on this loss."""

  def loss(trainable, frozen, batch, key):
    value, _ = loss_fn(trainable, frozen, batch, key, models, train=True)
    return value, {"examples": jnp.sum(batch["valid"].astype(jnp.float32))}

  return train_state.make_train_step(loss, optimizer, schedule)


def make_eval_step(models: Models, layout: train_state.FlatLayout | None = None):
  """(params, frozen, batch, key) -> (sum of per-example losses over valid rows, number of valid rows), params as
  the train state keeps them (flat with its `layout`). No dropout; the caller fixes `key` per validation batch so
  every epoch sees the same noise and timesteps."""

  def step(params, frozen, batch, key):
    trainable = params if layout is None else layout.unravel(params)
    _, per_example = loss_fn(trainable, frozen, batch, key, models, train=False)
    valid = batch["valid"].astype(jnp.float32)
    return jnp.sum(per_example * valid), jnp.sum(valid)

  return step

"""Tiny random model folders in the stock formats, built without torch or downloads: what the demo configs run on.

`make_tiny_pipeline(folder)` writes an SD-2-inpainting-shaped pipeline folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) with random weights: every loader and the whole sampler run on it, in
seconds, on one CPU core. The tokenizer is a real CLIP BPE tokenizer with no merges (character level), since no
CLIP vocabulary ships with the core install; its special tokens follow SD-2 (pad "!" = id 0).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from idmp_jax.convert.torch_format import write_json
from idmp_jax.models import clip, unet, vae

TINY_UNET = dict(
    in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8)
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                sample_size=64)
# The tiny CLIP text tower; its width follows the UNet's cross_attention_dim (`tiny_text_config`).
TINY_TEXT = dict(vocab_size=514, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu",
                 eos_token_id=2, bos_token_id=0, pad_token_id=1, projection_dim=32)
SD2_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "prediction_type": "epsilon"}


def bytes_to_unicode() -> dict[int, str]:
  """CLIP's reversible byte -> printable character map (the base alphabet of its BPE vocabulary)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def make_char_clip_tokenizer(folder: str) -> str:
  """A CLIPTokenizer folder with the 512 base symbols, no merges, BOS 512, EOS 513, pad "!" (id 0)."""
  os.makedirs(folder, exist_ok=True)
  alphabet = list(bytes_to_unicode().values())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({c + "</w>": i + 256 for i, c in enumerate(alphabet)})
  vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  write_json({"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77, "do_lower_case": True},
             os.path.join(folder, "tokenizer_config.json"))
  return folder


def tiny_text_config(hidden_size: int) -> clip.CLIPTextConfig:
  return clip.CLIPTextConfig(hidden_size=hidden_size, **TINY_TEXT)


def write_pipeline_files(folder: str) -> None:
  """The weightless parts of a tiny pipeline folder: tokenizer, scheduler config and model_index.json."""
  make_char_clip_tokenizer(os.path.join(folder, "tokenizer"))
  write_json(SD2_SCHEDULER, os.path.join(folder, "scheduler", "scheduler_config.json"))
  write_json({"_class_name": "StableDiffusionInpaintPipeline", "_diffusers_version": "0.42.1",
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
              "feature_extractor": [None, None], "requires_safety_checker": False},
             os.path.join(folder, "model_index.json"))


def make_tiny_pipeline(folder: str, seed: int = 0) -> str:
  """Writes a tiny random SD-2-inpainting-shaped pipeline folder; returns it. Idempotent per folder."""
  if os.path.exists(os.path.join(folder, "model_index.json")):
    return folder
  k_unet, k_vae, k_text = jax.random.split(jax.random.key(seed), 3)
  ucfg = unet.UNetConfig.from_dict(TINY_UNET)
  uparams = jax.jit(lambda k: unet.init_params(ucfg, k, size=8, seq=4))(k_unet)
  unet.save_pretrained(os.path.join(folder, "unet"), ucfg, uparams)

  vcfg = vae.AutoencoderKLConfig.from_dict(TINY_VAE)
  vparams = jax.jit(lambda k: vae.AutoencoderKL(vcfg).init(k, jnp.zeros((1, 16, 16, 3)))["params"])(k_vae)
  vae.save_vae(os.path.join(folder, "vae"), vcfg, vparams)

  tcfg = tiny_text_config(ucfg.cross_attention_dim)
  tparams = jax.jit(lambda k: clip.CLIPTextTransformer(tcfg).init(k, jnp.zeros((1, 77), jnp.int32))["params"])(k_text)
  clip.save_text_encoder(os.path.join(folder, "text_encoder"), tcfg, tparams)
  write_pipeline_files(folder)
  return folder

"""The JAX sampler against diffusers' StableDiffusionInpaintPipeline on tiny random components (RCA off), and
against the same pipeline with the paper's attention patched in (RCA on)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from idmp_jax import sampling
from idmp_jax.data.inpainting import pack_prompts
from idmp_jax.data.tokenizer import load_clip_tokenizer
from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder
from tests.torch_rca import patched_rca

SIZE, STEPS, GUIDANCE = 64, 4, 7.5


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
  from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      in_channels=9, out_channels=4, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
      attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  with torch.no_grad():  # diffusers zero-inits conv_out and proj_out; random weights everywhere.
    for p in unet.parameters():
      p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.1))
  vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                      latent_channels=4, sample_size=SIZE)
  text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, hidden_act="gelu", eos_token_id=2,
                                      max_position_embeddings=77))
  tok_dir = make_clip_tokenizer_folder(tmp_path_factory.mktemp("tok"))
  scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                            steps_offset=1, set_alpha_to_one=False)
  pipe = StableDiffusionInpaintPipeline(vae=vae.eval(), text_encoder=text.eval(),
                                        tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=unet.eval(),
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  folder = str(tmp_path_factory.mktemp("pipeline"))
  pipe.save_pretrained(folder)
  models, params = sampling.load_models(folder)
  return pipe, folder, models, params, load_clip_tokenizer(folder)


def make_images(rng, batch):
  images, masks = [], []
  for _ in range(batch):
    images.append(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    m = np.zeros((SIZE, SIZE), np.uint8)
    y, x = rng.integers(0, SIZE // 2, 2)
    m[y:y + SIZE // 2, x:x + SIZE // 3] = 255
    masks.append(m)
  return images, masks


def run_jax(models, params, batch, noise, posterior):
  fn = jax.jit(sampling.make_sample_fn(models, sampling.SamplerOptions(num_inference_steps=STEPS,
                                                                       guidance_scale=GUIDANCE,
                                                                       attention_impl="xla")))
  return np.asarray(fn(params, batch, jnp.asarray(noise), jnp.asarray(posterior)))


def torch_noises(batch, seed=0):
  """The pipeline's only random draw when latents are given: the masked-image posterior sample."""
  latents = torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed + 1))
  posterior = torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))
  return latents, posterior


def jax_batch(images, masks, input_ids, uncond_ids):
  return dict(pixel_values=np.stack(images).astype(np.float32) / 255 * 2 - 1,
              mask=(np.stack(masks)[..., None] / 255).astype(np.float32),
              input_ids=np.asarray(input_ids, np.int32), uncond_ids=np.asarray(uncond_ids, np.int32))


def test_pipeline_parity_rca_off(tiny_pipeline, rng):
  pipe, _, models, params, tok = tiny_pipeline
  images, masks = make_images(rng, 2)
  prompts = ["a red boat on the sea", "two cats sleeping on a sofa"]
  latents, posterior = torch_noises(2)
  ref = pipe(prompt=prompts, image=[Image.fromarray(i) for i in images], mask_image=[Image.fromarray(m) for m in masks],
             height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents.clone(),
             generator=torch.Generator().manual_seed(0), output_type="np").images
  batch = jax_batch(images, masks, tok(prompts), tok([""])[0])
  ours = run_jax(models, params, batch, latents.numpy().transpose(0, 2, 3, 1), posterior.numpy().transpose(0, 2, 3, 1))
  assert ref.shape == ours.shape == (2, SIZE, SIZE, 3)
  assert ref.std() > 0.01
  assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


def test_pipeline_parity_rca_on(tiny_pipeline, rng):
  pipe, _, models, params, tok = tiny_pipeline
  images, masks = make_images(rng, 2)
  prompts = [["a red boat", "a stormy sky"], ["a cat", "a green sofa", "a lamp"]]
  packed = [pack_prompts(tok.encode(p), rca=True, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         period_id=tok.period_id) for p in prompts]
  input_ids = np.stack([p[0] for p in packed])
  token_region = np.stack([p[1] for p in packed])
  region_masks = np.zeros((2, 6, SIZE, SIZE), np.float32)
  for b, p in enumerate(prompts):  # Split each example's mask into vertical bands, one region per prompt.
    m = masks[b] > 0
    region_masks[b, 0] = 1
    bands = np.array_split(np.arange(SIZE), len(p))
    for i, cols in enumerate(bands):
      r = np.zeros_like(m)
      r[:, cols] = m[:, cols]
      region_masks[b, i + 1] = r | ~m
  latents, posterior = torch_noises(2, seed=3)
  with torch.no_grad():
    cond = pipe.text_encoder(torch.from_numpy(input_ids).long())[0]
    uncond = pipe.text_encoder(torch.from_numpy(tok([""])).long())[0].expand_as(cond)
  cfg_regions = np.concatenate([region_masks] * 2)
  cfg_tokens = np.concatenate([np.zeros_like(token_region), token_region])
  with patched_rca(pipe.unet, cfg_regions, cfg_tokens):
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=[Image.fromarray(i) for i in images],
               mask_image=[Image.fromarray(m) for m in masks], height=SIZE, width=SIZE, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=latents.clone(), generator=torch.Generator().manual_seed(3),
               output_type="np").images
  batch = jax_batch(images, masks, input_ids, tok([""])[0])
  batch.update(token_region=token_region, region_masks=region_masks)
  ours = run_jax(models, params, batch, latents.numpy().transpose(0, 2, 3, 1), posterior.numpy().transpose(0, 2, 3, 1))
  err = np.abs(ours - ref).max()
  assert err <= 1e-3, err
  del batch["token_region"], batch["region_masks"]
  stock = run_jax(models, params, batch, latents.numpy().transpose(0, 2, 3, 1), posterior.numpy().transpose(0, 2, 3, 1))
  # RCA changes the painting by far more than the parity error, so the comparison above can fail. (The tiny
  # random VAE decoder compresses every difference, hence a relative criterion.)
  assert np.abs(stock - ref).max() > 20 * err, (np.abs(stock - ref).max(), err)


def test_example_noise_is_per_stem():
  keys = jnp.stack([sampling.example_key(42, s) for s in ["a", "b", "a"]])
  noise, posterior = sampling.draw_noise(keys, (4, 4, 4))
  np.testing.assert_array_equal(noise[0], noise[2])
  assert not np.allclose(noise[0], noise[1]) and not np.allclose(noise[0], posterior[0])


def test_lora_checkpoint_is_merged_into_the_unet(tiny_pipeline, tmp_path, rng):
  """FineTuned variants: `load_models(lora=...)` gives base + scale * A B in every adapted kernel."""
  from flax import traverse_util
  from idmp_jax.models import lora, unet
  _, folder, _, params, _ = tiny_pipeline
  adapted = lora.init_lora(params["unet"], jax.random.key(1), rank=4, alpha=4)
  adapted = jax.tree_util.tree_map_with_path(  # Non-zero B, so the adapter does something.
      lambda p, x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * 0.1
      if getattr(p[-1], "key", None) == "lora_b" else x, adapted)
  path = lora.save_diffusers_lora(str(tmp_path), adapted, unet.LIST_NAMES)
  _, merged = sampling.load_models(folder, lora=path)
  _, half = sampling.load_models(folder, lora=path, lora_scale=0.5)
  flat_base = traverse_util.flatten_dict(params["unet"])
  flat = traverse_util.flatten_dict(merged["unet"])
  flat_half = traverse_util.flatten_dict(half["unet"])
  key = next(p for p in flat if p[-2:] == ("to_q", "kernel"))
  mod = traverse_util.flatten_dict(adapted)
  delta = np.asarray(mod[key[:-1] + ("lora_a",)]) @ np.asarray(mod[key[:-1] + ("lora_b",)])
  np.testing.assert_allclose(flat[key], flat_base[key] + delta, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat_half[key], flat_base[key] + 0.5 * delta, rtol=1e-5, atol=1e-6)
  assert set(flat) == set(flat_base)  # A plain base tree: the LoRA leaves are folded away.
  with pytest.raises(Exception, match="nope"):
    sampling.load_models(folder, lora=str(tmp_path / "nope.safetensors"))

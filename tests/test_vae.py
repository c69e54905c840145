"""Parity of idmp_jax.models.vae with diffusers' AutoencoderKL (tiny random models)."""
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file, save_file

from idmp_jax.convert.torch_format import CheckpointError
from idmp_jax.models import vae
from tests.conftest import rel_err

TOL = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _model(tmp_path, name="vae", **overrides):
  torch.manual_seed(0)
  kwargs = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=32)
  model = AutoencoderKL(**dict(kwargs, **overrides)).eval()
  with torch.no_grad():  # Norms start at (1, 0): perturb them so a swapped norm parameter would show.
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path / name)
  model.save_pretrained(folder)
  return model, folder


def _jitted(config):
  return (jax.jit(functools.partial(vae.encode, config)), jax.jit(functools.partial(vae.decode, config)))


def test_vae_parity_and_round_trip(tmp_path, rng):
  model, folder = _model(tmp_path)
  config, params = vae.load_vae(folder)
  assert config.scaling_factor == 0.18215 and config.downscale == 2
  encode, decode = _jitted(config)
  images = rng.uniform(-1, 1, size=(2, 3, 16, 24)).astype(np.float32)  # Non-square: catches H/W swaps.
  latents = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images)).latent_dist
    ref_dec = model.decode(torch.from_numpy(latents)).sample
    ref_rec = model.decode(dist.mean).sample
  mean, logvar = encode(params, images)
  assert mean.shape == (2, 4, 8, 12)
  assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
  assert rel_err(decode(params, latents), ref_dec) <= TOL
  assert rel_err(decode(params, mean), ref_rec) <= TOL
  # Sampling is mean + std * eps.
  key = jax.random.PRNGKey(0)
  eps = jax.random.normal(key, (mean.size,)).reshape(mean.shape)
  np.testing.assert_allclose(vae.sample_latent(mean, logvar, key), mean + np.exp(0.5 * logvar) * eps, rtol=1e-6,
                             atol=1e-6)
  # Export: diffusers loads it with every tensor bit-identical.
  out = str(tmp_path / "out")
  vae.save_vae(out, config, params)
  back = AutoencoderKL.from_pretrained(out)
  sa, sb = model.state_dict(), back.state_dict()
  assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
  configs = [json.load(open(os.path.join(f, "config.json"))) for f in (folder, out)]
  assert configs[0].pop("_diffusers_version") and configs[0] == configs[1]
  assert vae.load_vae(out)[0] == config


def test_vae_variants_fp16_and_clamp(tmp_path, rng):
  """No quant convs, no mid attention, three blocks; fp16 weights; logvar clamp."""
  model, folder = _model(tmp_path, block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2,
                         use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
  model.half().save_pretrained(folder)
  model.float()  # The fp16-rounded weights, in fp32: the reference.
  config, params = vae.load_vae(folder)
  encode, decode = _jitted(config)
  images = rng.uniform(-1, 1, size=(1, 3, 24, 16)).astype(np.float32)
  latents = rng.standard_normal((1, 4, 3, 5)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images)).latent_dist
    ref_dec = model.decode(torch.from_numpy(latents)).sample
  mean, logvar = encode(params, images)
  assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
  assert rel_err(decode(params, latents), ref_dec) <= TOL
  # fp16 export is bit-identical to the fp16 file.
  vae.save_vae(str(tmp_path / "out16"), config, params, dtype=np.float16)
  a, b = load_file(os.path.join(folder, WEIGHTS)), load_file(str(tmp_path / "out16" / WEIGHTS))
  assert set(a) == set(b) and all(a[k].dtype == b[k].dtype == np.float16 and np.array_equal(a[k], b[k]) for k in a)
  # The logvar clamp: scale conv_out so that logvar leaves [-30, 20].
  big = jax.tree_util.tree_map(np.array, params)
  big["encoder"]["conv_out"]["bias"][4:] = [1e3, -1e3] * 2
  _, lv = encode(big, images)
  assert float(lv.max()) == 20.0 and float(lv.min()) == -30.0


def test_vae_deprecated_attention_names(tmp_path):
  model, folder = _model(tmp_path)
  sd = load_file(os.path.join(folder, WEIGHTS))
  new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for k, v in sd.items():
    for a, b in new.items():
      if ".attentions.0." + a + "." in k:
        k = k.replace(".attentions.0." + a + ".", ".attentions.0." + b + ".")
    old[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
  save_file(old, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
  config, params = vae.load_vae(folder)
  back = vae.state_dict_from_params(params)
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("key,value", [("down_block_types", ["AttnDownEncoderBlock2D"]), ("act_fn", "gelu"),
                                       ("norm_type", "spatial"), ("_class_name", "AsymmetricAutoencoderKL")])
def test_vae_config_refused(tmp_path, key, value):
  raw = dict(vae.AutoencoderKLConfig().to_dict(), **{key: value})
  os.makedirs(tmp_path / "vae")
  with open(tmp_path / "vae" / "config.json", "w") as f:
    json.dump(raw, f)
  with pytest.raises(CheckpointError, match=f"vae/config.json.*{key}"):  # Path and key named.
    vae.load_vae(str(tmp_path / "vae"))

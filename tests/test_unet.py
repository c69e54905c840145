"""The Flax UNet against diffusers: loading, parity (RCA off and on), export, config checks, sharding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel as TorchUNet

from idmp_jax.convert import torch_format
from idmp_jax.models import unet
from tests.conftest import rel_err
from tests.torch_rca import patched_rca

TINY_CONFIGS = {
    # The SD-2 inpainting shape, shrunk: 9 input channels, linear projections, heads per block.
    "inpaint_linear": dict(
        in_channels=9, out_channels=4, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=(2, 4), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # Conv projections, three levels (all with cross-attention), two transformer layers, int head count.
    "conv_proj_3level": dict(
        in_channels=4, out_channels=4, sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2,
        attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8, use_linear_projection=False,
        transformer_layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    # SD-2 block pattern (cross-attention except the deepest level), upcast attention.
    "sd2_pattern_upcast": dict(
        in_channels=9, out_channels=4, sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        attention_head_dim=(1, 2, 2, 4), cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}


def make_torch_unet(name, seed=0):
  torch.manual_seed(seed)
  model = TorchUNet(**TINY_CONFIGS[name]).eval()
  # diffusers zero-initialises some output layers; randomise every weight so nothing is trivially zero.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * (0.5 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.1))
  return model


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
  out = {}
  for name in TINY_CONFIGS:
    model = make_torch_unet(name)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (model, folder)
  return out


def random_inputs(rng, cfg, batch, h, w, seq=7):
  sample = rng.standard_normal((batch, cfg.in_channels, h, w)).astype(np.float32)
  t = rng.integers(0, 1000, size=(batch,))
  ctx = rng.standard_normal((batch, seq, cfg.cross_attention_dim)).astype(np.float32)
  return sample, t, ctx


def run_ours(config, params, sample_nchw, t, ctx, **rca):
  model = unet.UNet2DConditionModel(config, attention_impl="xla")
  out = model.apply({"params": params}, jnp.asarray(sample_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t),
                    jnp.asarray(ctx), **{k: jnp.asarray(v) for k, v in rca.items()})
  return np.asarray(out).transpose(0, 3, 1, 2)


def run_torch(model, sample, t, ctx):
  with torch.no_grad():
    return model(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


@pytest.mark.parametrize("name,hw", [("inpaint_linear", (16, 16)), ("inpaint_linear", (12, 20)),
                                     ("conv_proj_3level", (13, 10)), ("sd2_pattern_upcast", (16, 24))])
def test_parity_rca_off(saved_unets, rng, name, hw):
  torch_model, folder = saved_unets[name]
  config, params = unet.load_pretrained(folder)
  sample, t, ctx = random_inputs(rng, config, 2, *hw)
  ref = run_torch(torch_model, sample, t, ctx)
  ours = run_ours(config, params, sample, t, ctx)
  assert np.abs(ref).mean() > 1e-2
  assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)


# ------------------------------------------------------------------------------------------------------------
# RCA: the paper's formula, stated in PyTorch, patched into diffusers as the processor of every attn2.


def torch_rca_forward(model, sample, t, ctx, region_masks, token_region):
  with patched_rca(model, region_masks, token_region):
    return run_torch(model, sample, t, ctx)


def random_rca(rng, batch, layout_hw, seq, num_regions=4):
  """Random region masks in the layout of SPEC §2.9 and a token -> region assignment like the packer's."""
  H, W = layout_hw
  masks = np.zeros((batch, num_regions, H, W), np.float32)
  token_region = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    k = rng.integers(1, num_regions)  # Prompts in this example; the rest of the regions are padding.
    objs = []
    for _ in range(k):
      y0, x0 = rng.integers(0, H // 2), rng.integers(0, W // 2)
      m = np.zeros((H, W), np.float32)
      m[y0:y0 + rng.integers(H // 4, H // 2 + 1), x0:x0 + rng.integers(W // 4, W // 2 + 1)] = 1
      objs.append(m)
    outside = 1 - np.clip(sum(objs), 0, 1)
    masks[b, 0] = 1
    for i, m in enumerate(objs):
      masks[b, i + 1] = np.maximum(m, outside)
    bounds = np.sort(rng.choice(np.arange(2, seq - 1), size=k, replace=False))
    start = 1
    for i, end in enumerate(bounds):
      token_region[b, start:end] = i + 1
      start = end
  return masks, token_region


@pytest.mark.parametrize("name,hw", [("inpaint_linear", (16, 16)), ("conv_proj_3level", (13, 10)),
                                     ("sd2_pattern_upcast", (16, 24))])
def test_parity_rca_on(saved_unets, rng, name, hw):
  torch_model, folder = saved_unets[name]
  config, params = unet.load_pretrained(folder)
  seq = 9
  sample, t, ctx = random_inputs(rng, config, 3, *hw, seq=seq)
  layout = (hw[0] * 8, hw[1] * 8)  # Region masks come at image resolution (8x the latents).
  region_masks, token_region = random_rca(rng, 3, layout, seq)
  ref = torch_rca_forward(torch_model, sample, t, ctx, region_masks, token_region)
  ours = run_ours(config, params, sample, t, ctx, region_masks=region_masks, token_region=token_region)
  assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)
  # The masks matter: the same inputs without RCA give a clearly different output (so the test can fail).
  stock = run_ours(config, params, sample, t, ctx)
  assert rel_err(stock, ref) > 1e-3


def test_rca_all_visible_equals_stock(saved_unets, rng):
  _, folder = saved_unets["inpaint_linear"]
  config, params = unet.load_pretrained(folder)
  sample, t, ctx = random_inputs(rng, config, 2, 16, 16)
  region_masks = np.ones((2, 3, 128, 128), np.float32)
  token_region = rng.integers(0, 3, size=(2, 7)).astype(np.int32)
  ours = run_ours(config, params, sample, t, ctx, region_masks=region_masks, token_region=token_region)
  np.testing.assert_array_equal(ours, run_ours(config, params, sample, t, ctx))


def test_rca_mask_rule():
  """The mask resize is torch's nearest from the layout (strided pick from 0), not a half-pixel resize."""
  from idmp_jax.models.attention import rca_mask
  layout = np.zeros((1, 2, 16, 16), np.float32)
  layout[0, 0] = 1
  layout[0, 1, ::4, ::4] = 1  # Only the pixels a [::4, ::4] pick sees.
  token_region = np.array([[0, 1, 1, 0]], np.int32)
  m = np.asarray(rca_mask(jnp.asarray(layout), jnp.asarray(token_region), 4, 4))
  assert m.shape == (1, 1, 16, 4)
  assert m[0, 0, :, 0].all() and m[0, 0, :, 3].all()
  assert m[0, 0, :, 1].all() and m[0, 0, :, 2].all()
  layout[0, 1] = 0
  layout[0, 1, 1::4, 1::4] = 1  # Centre samples (what a half-pixel resize would pick) are invisible.
  m = np.asarray(rca_mask(jnp.asarray(layout), jnp.asarray(token_region), 4, 4))
  assert not m[0, 0, :, 1].any() and m[0, 0, :, 0].all()


@pytest.mark.parametrize("t,s", [(9, 77), (8, 77), (9, 8)])
def test_even_length_padding_for_cudnn_is_exact(t, s):
  """The padding that cuDNN's training kernel needs (odd lengths with a mask) changes neither the output nor the
  gradients (checked on the XLA path, which runs anywhere)."""
  from idmp_jax.models.attention import dot_product_attention, pad_to_even_lengths
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, t, 3, 8))
  k, v = (jax.random.normal(kk, (2, s, 3, 8)) for kk in keys[1:3])
  mask = jax.random.bernoulli(keys[3], 0.6, (2, 1, t, s)).at[..., 0].set(True)

  def plain(q, k, v):
    return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask=mask, implementation="xla")))

  def padded(q, k, v):
    qp, kp, vp, mp = pad_to_even_lengths(q, k, v, mask)
    assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and mp.shape[-2:] == (qp.shape[1], kp.shape[1])
    return jnp.sum(jnp.sin(dot_product_attention(qp, kp, vp, mask=mp, implementation="xla")[:, :t]))

  (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (plain, padded))
  assert rel_err(b, a) <= 1e-6
  for x, y in zip(gb, ga):
    assert x.shape == y.shape and rel_err(x, y) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# Formats.


def test_export_round_trip_bit_exact(saved_unets, tmp_path):
  torch_model, folder = saved_unets["sd2_pattern_upcast"]
  config, params = unet.load_pretrained(folder)
  unet.save_pretrained(str(tmp_path), config, params)
  reloaded = TorchUNet.from_pretrained(str(tmp_path))
  ref, got = torch_model.state_dict(), reloaded.state_dict()
  assert set(ref) == set(got)
  for key in ref:
    assert torch.equal(ref[key], got[key]), key
  assert reloaded.config.upcast_attention and reloaded.config.in_channels == 9


def test_fp16_folder_loads_and_round_trips(tmp_path):
  model = make_torch_unet("inpaint_linear").half()
  model.save_pretrained(str(tmp_path / "a"), variant="fp16")  # diffusion_pytorch_model.fp16.safetensors
  config, params = unet.load_pretrained(str(tmp_path / "a"))
  leaf = jax.tree.leaves(params)[0]
  assert leaf.dtype == np.float32  # Params stay fp32 whatever the file holds.
  unet.save_pretrained(str(tmp_path / "b"), config, params, dtype=np.float16)
  reloaded = TorchUNet.from_pretrained(str(tmp_path / "b"), torch_dtype=torch.float16)
  for key, value in model.state_dict().items():
    assert torch.equal(value, reloaded.state_dict()[key]), key


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2D"),
                                       ("resnet_time_scale_shift", "scale_shift"), ("some_future_key", 3)])
def test_unsupported_config_is_refused(saved_unets, tmp_path, key, value):
  _, folder = saved_unets["inpaint_linear"]
  cfg = json.load(open(os.path.join(folder, "config.json")))
  cfg[key] = value
  os.makedirs(tmp_path / "u")
  json.dump(cfg, open(tmp_path / "u" / "config.json", "w"))
  with pytest.raises(torch_format.CheckpointError, match=key):
    unet.load_pretrained(str(tmp_path / "u"))


def test_missing_and_wrong_weights_are_named(saved_unets, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, folder = saved_unets["inpaint_linear"]
  os.makedirs(tmp_path / "u")
  cfg = json.load(open(os.path.join(folder, "config.json")))
  json.dump(cfg, open(tmp_path / "u" / "config.json", "w"))
  state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  del state["conv_in.weight"]
  state["conv_out.bias"] = np.zeros(5, np.float32)
  save_file(state, str(tmp_path / "u" / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(torch_format.CheckpointError) as e:
    unet.load_pretrained(str(tmp_path / "u"))
  assert "conv_in.weight" in str(e.value) and "conv_out.bias" in str(e.value)
  with pytest.raises(torch_format.CheckpointError, match="nope.*not found"):
    unet.load_pretrained(str(tmp_path / "nope"))


SD2_INPAINTING = dict(
    in_channels=9, out_channels=4, sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, flip_sin_to_cos=True, freq_shift=0)


def test_full_sd2_inpainting_shape_maps_one_to_one():
  config = unet.UNetConfig.from_dict(dict(SD2_INPAINTING))
  abstract = unet.abstract_params(config)
  flat = {torch_format.torch_key(p, unet.LIST_NAMES): v
          for p, v in __import__("flax").traverse_util.flatten_dict(abstract).items()}
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == 865_925_124
  with torch.device("meta"):
    ref = TorchUNet(**SD2_INPAINTING)
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert sum(int(np.prod(s)) for s in ref_shapes.values()) == 865_925_124
  assert set(flat) == set(ref_shapes)
  for key, v in flat.items():
    shape = ref_shapes[key]
    expect = shape[::-1] if len(shape) == 2 else (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
    assert tuple(v.shape) == tuple(expect), key


def test_sharded_forward_equals_single_device(saved_unets, rng):
  from idmp_jax import parallel
  assert jax.device_count() == 8
  _, folder = saved_unets["inpaint_linear"]
  config, params = unet.load_pretrained(folder)
  sample, t, ctx = random_inputs(rng, config, 8, 16, 16)
  region_masks, token_region = random_rca(rng, 8, (128, 128), 7)
  model = unet.UNet2DConditionModel(config, attention_impl="xla")
  batch = dict(sample=sample.transpose(0, 2, 3, 1), timesteps=t, encoder_hidden_states=ctx,
               region_masks=region_masks, token_region=token_region)
  fwd = jax.jit(lambda p, b: model.apply({"params": p}, **b))
  single = np.asarray(fwd(params, batch))
  mesh = parallel.make_mesh({"mesh": {"data": -1}})
  sharded_batch = parallel.shard_batch(batch, mesh)
  assert len(sharded_batch["sample"].sharding.device_set) == 8
  out = fwd(jax.device_put(params, parallel.replicated(mesh)), sharded_batch)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5)


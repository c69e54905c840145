"""LoRA as a param-tree transform: init (peft's rule), split/merge, merge_lora/unmerge, dropout, and the diffusers
file format, checked against diffusers + peft on a tiny UNet."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from idmp_jax.models import lora, unet
from idmp_jax.train.tiny import write_random_pipeline
from tests.conftest import rel_err

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return write_random_pipeline(str(tmp_path_factory.mktemp("tiny_pipeline")), seed=3)


@pytest.fixture(scope="module")
def base(pipeline_dir):
  return unet.load_pretrained(os.path.join(pipeline_dir, "unet"))


def inputs(rng, cfg, batch=2, hw=(8, 8), seq=7):
  x = rng.standard_normal((batch, *hw, cfg.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, batch)
  ctx = rng.standard_normal((batch, seq, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, ctx


_FORWARDS = {}


def forward(cfg, params, x, t, ctx, rngs=None):
  """The UNet, jitted (one compile per param-tree structure beats op-by-op dispatch of every layer)."""
  if cfg not in _FORWARDS:
    model = unet.UNet2DConditionModel(cfg, attention_impl="xla")
    _FORWARDS[cfg] = jax.jit(lambda p, x, t, c, r: model.apply({"params": p}, x, t, c, rngs=r))
  return np.asarray(_FORWARDS[cfg](params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), rngs or {}))


def randomize_b(params, seed=0, std=0.2):
  """Trained-looking adapters: B != 0 (a fresh adapter is a no-op by construction)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(params)
  for path in sorted(flat):
    if path[-1] == "lora_b":
      flat[path] = jnp.asarray(rng.standard_normal(flat[path].shape).astype(np.float32) * std)
  return traverse_util.unflatten_dict(flat)


def test_init_follows_peft(base):
  cfg, params = base
  p = lora.init_lora(params, jax.random.key(0), rank=4, alpha=8, init="gaussian", dropout=0.05)
  modules = lora.adapted_modules(params)
  names = {m[-1] for m in modules}
  assert names == {"to_q", "to_k", "to_v", "to_out_0"}
  flat = traverse_util.flatten_dict(p)
  a = np.concatenate([np.asarray(flat[m + ("lora_a",)]).ravel() for m in modules])
  assert abs(a.std() - 1 / 4) < 0.02 and abs(a.mean()) < 0.02  # peft: normal_(std=1/r)
  for m in modules:
    fan_in, fan_out = flat[m + ("kernel",)].shape
    assert flat[m + ("lora_a",)].shape == (fan_in, 4) and flat[m + ("lora_b",)].shape == (4, fan_out)
    assert not np.any(np.asarray(flat[m + ("lora_b",)]))
    assert float(flat[m + ("lora_scale",)]) == 2.0 and float(flat[m + ("lora_dropout",)]) == np.float32(0.05)
  # The same number of trainable weights as peft puts on the diffusers UNet.
  from diffusers import UNet2DConditionModel as TorchUNet
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  torch_unet = TorchUNet(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
  torch_unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
  assert lora.count(p) == sum(v.numel() for v in get_peft_model_state_dict(torch_unet).values())
  # Layers draw independent keys: two layers of the same shape differ.
  same = [m for m in modules if flat[m + ("lora_a",)].shape == flat[modules[0] + ("lora_a",)].shape]
  assert not np.array_equal(flat[same[0] + ("lora_a",)], flat[same[1] + ("lora_a",)])
  k = lora.init_lora(params, jax.random.key(0), rank=4, alpha=4, init="kaiming")
  ka = np.asarray(traverse_util.flatten_dict(k)[modules[0] + ("lora_a",)])
  assert np.abs(ka).max() <= 1 / np.sqrt(ka.shape[0])


def test_fresh_adapter_is_exact_noop_and_split_merge(base, rng):
  cfg, params = base
  p = lora.init_lora(params, jax.random.key(1), rank=4, alpha=4, dropout=0.1)
  x, t, ctx = inputs(rng, cfg)
  np.testing.assert_array_equal(forward(cfg, p, x, t, ctx), forward(cfg, params, x, t, ctx))
  trainable, frozen = lora.split(p)
  leaves = traverse_util.flatten_dict(trainable)
  assert leaves and all(path[-1] in ("lora_a", "lora_b") for path in leaves)
  assert not any(path[-1] in ("lora_a", "lora_b") for path in traverse_util.flatten_dict(frozen))
  mask = traverse_util.flatten_dict(lora.trainable_mask(p))
  assert {path for path, m in mask.items() if m} == set(leaves)
  merged = lora.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(p)
  assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(p)))
  with pytest.raises(ValueError, match="more than one"):
    lora.merge(trainable, p)


def test_merge_unmerge(base, rng):
  cfg, params = base
  p = randomize_b(lora.init_lora(params, jax.random.key(2), rank=4, alpha=8))
  x, t, ctx = inputs(rng, cfg)
  adapted = forward(cfg, p, x, t, ctx)
  assert rel_err(adapted, forward(cfg, params, x, t, ctx)) > 1e-2  # The adapters matter.
  merged = lora.merge_lora(p)
  assert not any(path[-1] in lora.LORA_LEAVES for path in traverse_util.flatten_dict(merged))
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert rel_err(forward(cfg, merged, x, t, ctx), adapted) <= 1e-5
  adapters = lora.split(p, lora.is_lora)[0]
  back = traverse_util.flatten_dict(lora.unmerge_lora(merged, adapters))
  orig = traverse_util.flatten_dict(p)
  assert set(back) == set(orig)
  for path, value in orig.items():
    if path[-1] in lora.LORA_LEAVES or path not in traverse_util.flatten_dict(merged) or \
        path[:-1] not in {m for m in lora.adapted_modules(params)}:
      np.testing.assert_array_equal(back[path], value)  # Untouched leaves are bit-exact.
    else:
      np.testing.assert_allclose(back[path], value, rtol=0, atol=1e-6)  # W' - dW: fp32 rounding only.


def test_dropout_only_with_rng(base, rng):
  cfg, params = base
  p = randomize_b(lora.init_lora(params, jax.random.key(3), rank=4, alpha=4, dropout=0.3))
  x, t, ctx = inputs(rng, cfg)
  eval_out = forward(cfg, p, x, t, ctx)
  np.testing.assert_array_equal(eval_out, forward(cfg, lora.merge(*lora.split(p)), x, t, ctx))
  d1 = forward(cfg, p, x, t, ctx, rngs={lora.DROPOUT_RNG: jax.random.key(0)})
  d2 = forward(cfg, p, x, t, ctx, rngs={lora.DROPOUT_RNG: jax.random.key(0)})
  d3 = forward(cfg, p, x, t, ctx, rngs={lora.DROPOUT_RNG: jax.random.key(1)})
  np.testing.assert_array_equal(d1, d2)
  assert rel_err(d1, eval_out) > 1e-3 and rel_err(d1, d3) > 1e-3
  # The mask itself: rate and inverted scaling, independent across keys.
  ones = jnp.ones((64, 1000), jnp.float32)
  m1 = np.asarray(lora._dropout(ones, jnp.float32(0.05), jax.random.key(5)))
  m2 = np.asarray(lora._dropout(ones, jnp.float32(0.05), jax.random.key(6)))
  assert abs((m1 == 0).mean() - 0.05) < 0.004 and abs(m1.mean() - 1) < 0.005
  assert abs(((m1 == 0) & (m2 == 0)).mean() - 0.05 ** 2) < 0.001
  np.testing.assert_array_equal(np.asarray(lora._dropout(ones, jnp.float32(0.0), jax.random.key(5))), ones)


@pytest.mark.parametrize("dropout", [False, True])
def test_adapted_linear_gradients_equal_autodiff(rng, dropout):
  """layers.Linear's adapted matmul (custom VJP, adapter folded into the base contraction) against autodiff of
  the plain formula W x + b + scale * B A dropout(x): outputs and the gradients of x, kernel, A and B."""
  import flax.linen as nn

  from idmp_jax.models import layers
  x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
  p = {"kernel": jnp.asarray(rng.standard_normal((12, 7)), jnp.float32),
       "bias": jnp.asarray(rng.standard_normal(7), jnp.float32),
       "lora_a": jnp.asarray(rng.standard_normal((12, 3)), jnp.float32),
       "lora_b": jnp.asarray(rng.standard_normal((3, 7)), jnp.float32),
       "lora_scale": jnp.float32(0.7), "lora_dropout": jnp.float32(0.3)}
  rngs = {lora.DROPOUT_RNG: jax.random.key(4)} if dropout else {}
  ours = lambda p, x: layers.Linear(7).apply({"params": p}, x, rngs=rngs)

  class FirstKey(nn.Module):  # The key a top-level module's first make_rng draws: the one Linear's mask uses.
    def __call__(self):
      return self.make_rng(lora.DROPOUT_RNG)

  key = FirstKey().apply({}, rngs=rngs) if dropout else None

  def plain(p, x):
    xd = lora._dropout(x, p["lora_dropout"], key) if dropout else x
    return x @ p["kernel"] + p["bias"] + p["lora_scale"] * (xd @ p["lora_a"]) @ p["lora_b"]

  assert rel_err(ours(p, x), plain(p, x)) < 1e-6
  ct = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
  grads = lambda f: jax.grad(lambda p, x: jnp.sum(f(p, x) * ct), argnums=(0, 1))(p, x)
  (g_ours, gx_ours), (g_plain, gx_plain) = grads(ours), grads(plain)
  assert rel_err(gx_ours, gx_plain) < 1e-6
  for leaf in ("kernel", "bias", "lora_a", "lora_b"):
    assert rel_err(g_ours[leaf], g_plain[leaf]) < 1e-6, leaf
  if dropout:  # The mask acted (else the test above could not tell a dropped gradient from a kept one).
    assert rel_err(ours(p, x), layers.Linear(7).apply({"params": p}, x)) > 1e-3


@pytest.mark.parametrize("dropout", [False, True])
def test_shared_input_adapters_equal_autodiff(rng, dropout):
  """`lora._lora_matmuls` on three layers sharing x (self-attention's to_q/k/v: one [x | h_1 | h_2 | h_3] operand,
  custom VJP) against autodiff of the plain formulas x W_i + s_i B_i A_i dropout_i(x), each with its own mask."""
  x = jnp.asarray(rng.standard_normal((10, 12)), jnp.float32)
  widths, ranks = (7, 5, 6), (3, 2, 3)
  kernels = tuple(jnp.asarray(rng.standard_normal((12, n)), jnp.float32) for n in widths)
  a = tuple(jnp.asarray(rng.standard_normal((12, r)), jnp.float32) for r in ranks)
  b = tuple(jnp.asarray(rng.standard_normal((r, n)), jnp.float32) for r, n in zip(ranks, widths))
  scale = tuple(jnp.float32(v) for v in (0.7, 1.3, 0.5))
  rate = tuple(jnp.float32(0.3) for _ in widths)
  seed = tuple(lora._seed(jax.random.key(i)) for i in range(3))

  def plain(x, kernels, a, b):
    drop = lambda i: lora._apply_dropout(x, rate[i], seed[i]) if dropout else x
    return tuple(x @ kernels[i] + scale[i] * (drop(i) @ a[i]) @ b[i] for i in range(3))

  ours = lambda x, kernels, a, b: lora._lora_matmuls(x, kernels, a, b, scale, rate, seed, dropout)
  for y, want in zip(ours(x, kernels, a, b), plain(x, kernels, a, b)):
    assert y.shape == want.shape and rel_err(y, want) < 1e-6
  cts = tuple(jnp.asarray(rng.standard_normal((10, n)), jnp.float32) for n in widths)
  loss = lambda f: lambda *args: sum(jnp.sum(y * ct) for y, ct in zip(f(*args), cts))
  g_ours = jax.grad(loss(ours), argnums=(0, 1, 2, 3))(x, kernels, a, b)
  g_plain = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, kernels, a, b)
  for got, want in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
    assert rel_err(got, want) < 1e-6
  if dropout:  # Each layer's own mask: the same adapter under the three seeds gives three different outputs.
    same = lambda s: lora._lora_matmuls(x, kernels[:1] * 3, a[:1] * 3, b[:1] * 3, scale[:1] * 3, rate, s, True)
    y0, y1, y2 = same(seed)
    assert rel_err(y0, y1) > 1e-3 and rel_err(y1, y2) > 1e-3


def test_self_attention_takes_the_shared_adapter_path(rng, monkeypatch):
  """attention.Attention runs self-attention's adapted to_q/k/v as one `adapted_matmuls` call, with the same output
  and LoRA gradients as the layer-by-layer path (no dropout: the two paths draw their masks differently)."""
  from idmp_jax.models import attention
  module = attention.Attention(heads=2, dim_head=4, implementation="xla")
  x = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
  params = lora.init_lora(module.init(jax.random.key(0), x)["params"], jax.random.key(1), rank=2, alpha=3)
  params = randomize_b(params)
  trainable, frozen = lora.split(params)
  calls = []
  shared = lora.adapted_matmuls
  monkeypatch.setattr(lora, "adapted_matmuls", lambda *a, **k: calls.append(a[1]) or shared(*a, **k))
  ct = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.float32)
  run = lambda t: jnp.sum(module.apply({"params": lora.merge(t, frozen)}, x) * ct)
  value, grads = jax.value_and_grad(run)(trainable)
  assert calls == [("to_q", "to_k", "to_v")]
  monkeypatch.setattr(lora, "shares_input", lambda *a: False)
  ref_value, ref_grads = jax.value_and_grad(run)(trainable)
  assert calls == [("to_q", "to_k", "to_v")]  # The layer-by-layer path this time.
  assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert rel_err(got, want) < 1e-5
  # Cross-attention (a context) keeps the layer-by-layer path.
  module.apply({"params": params}, x, context=jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32))
  assert len(calls) == 1


def _torch_inputs(x, t, ctx):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(ctx)


@pytest.mark.parametrize("key_style", ["diffusers", "peft"])
def test_export_loads_in_diffusers_pipeline(pipeline_dir, base, rng, tmp_path, key_style):
  """Our file through `pipe.load_lora_weights` changes diffusers' UNet as the adapters change ours (alpha != r,
  so the scale must come through the file's metadata)."""
  from diffusers import StableDiffusionInpaintPipeline
  cfg, params = base
  p = randomize_b(lora.init_lora(params, jax.random.key(4), rank=4, alpha=8))
  path = lora.save_diffusers_lora(str(tmp_path), p, unet.LIST_NAMES, key_style=key_style)
  from safetensors.numpy import load_file
  keys = list(load_file(path))
  assert all(k.startswith("unet.") for k in keys)
  assert any(k.endswith(".to_out.0.lora.down.weight" if key_style == "diffusers" else ".to_out.0.lora_A.weight")
             for k in keys)

  pipe = StableDiffusionInpaintPipeline.from_pretrained(pipeline_dir, safety_checker=None, feature_extractor=None)
  x, t, ctx = inputs(rng, cfg, seq=9)
  with torch.no_grad():
    ref_base = pipe.unet(*_torch_inputs(x, t, ctx)).sample.numpy().transpose(0, 2, 3, 1)
    pipe.load_lora_weights(str(tmp_path))
    pipe.unet.eval()  # peft creates its dropout modules in training mode
    ref = pipe.unet(*_torch_inputs(x, t, ctx)).sample.numpy().transpose(0, 2, 3, 1)
  ours_base, ours = forward(cfg, params, x, t, ctx), forward(cfg, p, x, t, ctx)
  assert rel_err(ours_base, ref_base) <= 1e-4
  assert rel_err(ours - ours_base, ref - ref_base) <= 1e-4
  assert rel_err(ours, ref) <= 1e-4
  assert rel_err(ours, ours_base) > 1e-2

  # And back: our reader gives the same adapters (alpha from the metadata).
  again = lora.load_diffusers_lora(str(tmp_path), params, unet.LIST_NAMES)
  np.testing.assert_array_equal(forward(cfg, again, x, t, ctx), ours)


def test_reads_what_the_original_writes(base, rng, tmp_path):
  """A LoRA trained with peft and saved the original's way (convert_state_dict_to_diffusers +
  save_lora_weights) loads into our UNet and gives diffusers' output."""
  from diffusers import StableDiffusionPipeline, UNet2DConditionModel as TorchUNet
  from diffusers.utils import convert_state_dict_to_diffusers
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  cfg, params = base
  folder = str(tmp_path / "unet")
  unet.save_pretrained(folder, cfg, params)
  torch_unet = TorchUNet.from_pretrained(folder).eval()
  torch.manual_seed(0)
  torch_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
  with torch.no_grad():
    for name, prm in torch_unet.named_parameters():
      if "lora_B" in name:
        prm.normal_(0, 0.2)
  torch_unet.eval()
  StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(torch_unet)),
      safe_serialization=True)
  x, t, ctx = inputs(rng, cfg)
  with torch.no_grad():
    ref = torch_unet(*_torch_inputs(x, t, ctx)).sample.numpy().transpose(0, 2, 3, 1)
  ours = forward(cfg, lora.load_diffusers_lora(str(tmp_path / "lora"), params, unet.LIST_NAMES), x, t, ctx)
  assert rel_err(ours, ref) <= 1e-4


def test_merged_unet_folder_loads_in_diffusers(base, rng, tmp_path):
  from diffusers import UNet2DConditionModel as TorchUNet
  cfg, params = base
  p = randomize_b(lora.init_lora(params, jax.random.key(5), rank=4, alpha=4))
  unet.save_pretrained(str(tmp_path), cfg, lora.merge_lora(p))
  x, t, ctx = inputs(rng, cfg)
  with torch.no_grad():
    ref = TorchUNet.from_pretrained(str(tmp_path)).eval()(*_torch_inputs(x, t, ctx)).sample.numpy()
  assert rel_err(forward(cfg, p, x, t, ctx), ref.transpose(0, 2, 3, 1)) <= 1e-4


def test_bad_files_are_named(base, tmp_path):
  from safetensors.numpy import save_file
  cfg, params = base
  save_file({"unet.nope.to_q.lora.down.weight": np.zeros((4, 8), np.float32),
             "unet.nope.to_q.lora.up.weight": np.zeros((8, 4), np.float32)}, str(tmp_path / lora.WEIGHT_NAME))
  with pytest.raises(Exception, match="nope.to_q: no Linear"):
    lora.load_diffusers_lora(str(tmp_path), params, unet.LIST_NAMES)
  with pytest.raises(ValueError, match="already holds"):
    lora.init_lora(lora.init_lora(params, jax.random.key(0), 4, 4), jax.random.key(0), 4, 4)

"""The residual stream's add + LayerNorm (idmp_jax.models.layers.residual_layer_norm): its XLA path and its Pallas
kernels (idmp_jax/models/pallas_norm.py, interpreted on the CPU) against autodiff of the plain formula, values and
gradients, with and without the add, at a channel count that is not a power of two (masked columns)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import layers, pallas_norm


def _plain(x, delta, scale, bias, eps=1e-5):
  h = x if delta is None else x + delta
  hf = h.astype(jnp.float32)
  mean = hf.mean(-1, keepdims=True)
  var = jnp.square(hf - mean).mean(-1, keepdims=True)
  return h, ((hf - mean) / jnp.sqrt(var + eps) * scale + bias).astype(x.dtype)


def _loss(fn, cot_h, cot_y):
  def loss(x, delta, scale, bias):
    h, y = fn(x, delta, scale, bias)
    return jnp.sum(h.astype(jnp.float32) * cot_h) + jnp.sum(y.astype(jnp.float32) * cot_y)
  return loss


@pytest.mark.parametrize("mode", ["xla", "interpret"])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("c,dtype,tol", [(80, jnp.float32, 1e-5), (320, jnp.bfloat16, 1.5e-2)])
def test_residual_layer_norm_matches_autodiff(monkeypatch, mode, with_delta, c, dtype, tol):
  monkeypatch.setattr(layers, "NORM_KERNELS", mode)
  rng = np.random.default_rng(c)
  arr = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
  x, cot_h, cot_y = arr(2, 24, c, scale=3.0) + 5.0, arr(2, 24, c), arr(2, 24, c)
  delta = arr(2, 24, c) if with_delta else None
  scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
  fused = lambda x, d, s, b: layers.residual_layer_norm(x, d, s, b, 1e-5)
  argnums = (0, 1, 2, 3) if with_delta else (0, 2, 3)
  got = (fused(x, delta, scale, bias), jax.grad(_loss(fused, cot_h, cot_y), argnums)(x, delta, scale, bias))
  want = (_plain(x, delta, scale, bias), jax.grad(_loss(_plain, cot_h, cot_y), argnums)(x, delta, scale, bias))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_kernels_equal_the_xla_path():
  """The kernels' h, y, statistics and dx against the plain formula, bf16, several row blocks."""
  rng = np.random.default_rng(1)
  rows, c = 64, 320
  x, delta, dy, dh = (jnp.asarray(rng.standard_normal((rows, c)), jnp.bfloat16) for _ in range(4))
  scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
  assert rows // pallas_norm.block_rows(rows, c, tile=1024) == 32  # 2 rows (of 512 padded columns) per program.
  h, y, mean, rstd = pallas_norm.forward(x, delta, scale, bias, eps=1e-5, interpret=True, tile=1024)
  want_h, want_y = _plain(x, delta, scale, bias)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(want_h, np.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32), atol=0.05)
  hf = np.asarray(want_h, np.float32)
  np.testing.assert_allclose(mean, hf.mean(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rstd, 1 / np.sqrt(hf.var(-1) + 1e-5), rtol=1e-4)
  dx = pallas_norm.backward(h, dy, dh, mean, rstd, scale, interpret=True, tile=1024)
  want_dx = jax.vjp(lambda h: _plain(h, None, scale, bias)[1], h)[1](dy)[0].astype(jnp.float32) + dh
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32), rtol=2e-2,
                             atol=2e-2 * float(jnp.abs(want_dx).max()))


def test_layer_norm_module_residual_form():
  """LayerNorm(residual=True) is (x + delta, LayerNorm(x + delta)) with the module's own parameters."""
  rng = np.random.default_rng(2)
  x, delta = (jnp.asarray(rng.standard_normal((3, 5, 40)), jnp.float32) for _ in range(2))
  module = layers.LayerNorm()
  params = module.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  h, y = module.apply(params, x, delta, residual=True)
  np.testing.assert_allclose(h, x + delta, rtol=1e-6)
  np.testing.assert_allclose(y, module.apply(params, x + delta), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="residual=True"):
    module.apply(params, x, delta)


def test_unknown_kernel_switch_is_refused(monkeypatch):
  monkeypatch.setattr(layers, "NORM_KERNELS", "triton")
  x = jnp.ones((2, 8, 16))
  with pytest.raises(ValueError, match="layers.NORM_KERNELS"):
    layers.residual_layer_norm(x, None, jnp.ones(16), jnp.zeros(16), 1e-5)


def test_transformer_block_through_the_kernels_equals_xla(monkeypatch):
  """The UNet's transformer block (its three norms through `residual_layer_norm`) with the kernels (interpreted)
  against XLA's path: output and the input's and attention weights' gradients, fp32; the forward and backward
  kernels each run once per norm."""
  import collections
  from idmp_jax.models import unet
  from tests.conftest import pallas_calls
  block = unet.BasicTransformerBlock(dim=80, heads=2, upcast=False, attention_impl="xla", dtype=jnp.float32)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 32, 80)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32)
  params = block.init(jax.random.key(0), x, context)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

  def loss(params, x):
    return jnp.sum(jnp.sin(block.apply(params, x, context)))

  results = {}
  for mode in ("xla", "interpret"):
    monkeypatch.setattr(layers, "NORM_KERNELS", mode)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    results[mode] = grad(params, x)
    calls = collections.Counter(name for name, _ in pallas_calls(grad, params, x))
    assert calls == ({} if mode == "xla" else {"layer_norm_forward": 3, "layer_norm_backward": 3})
  for got, want in zip(jax.tree.leaves(results["interpret"]), jax.tree.leaves(results["xla"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))

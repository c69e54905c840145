"""The norms' custom VJP (idmp_jax.models.layers.normalize) against autodiff of the plain formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from idmp_jax.models.layers import GroupNorm, LayerNorm


def _plain_group_norm(x, scale, bias, groups, eps, silu, dtype):
  """The reference's formula, differentiated by JAX itself."""
  shape = x.shape
  xg = x.astype(jnp.float32).reshape(shape[0], -1, groups, shape[-1] // groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
  y = (((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(shape) * scale + bias).astype(dtype)
  return nn.silu(y) if silu else y


def _plain_layer_norm(x, scale, bias, eps, dtype):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y.astype(dtype)


def _inputs(shape, dtype, seed=0):
  r = np.random.default_rng(seed)
  c = shape[-1]
  # A channel offset makes mean and variance matter (a zero-mean input would hide a wrong mean term).
  x = jnp.asarray(r.standard_normal(shape) * 2.0 + r.standard_normal(c) * 3.0, dtype)
  scale = jnp.asarray(1.0 + 0.5 * r.standard_normal(c), jnp.float32)
  bias = jnp.asarray(0.5 * r.standard_normal(c), jnp.float32)
  cot = jnp.asarray(r.standard_normal(shape), dtype)
  return x, scale, bias, cot


def _vjp(f, x, scale, bias, cot):
  out, pull = jax.vjp(f, x, scale, bias)
  return (out,) + pull(cot)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_group_norm_matches_autodiff(silu, dtype, tol):
  x, scale, bias, cot = _inputs((2, 5, 6, 16), dtype)
  mod = GroupNorm(4, 1e-5, dtype=dtype, activation="silu" if silu else None)
  ours = _vjp(lambda x, s, b: mod.apply({"params": {"scale": s, "bias": b}}, x), x, scale, bias, cot)
  ref = _vjp(lambda x, s, b: _plain_group_norm(x, s, b, 4, 1e-5, silu, dtype), x, scale, bias, cot)
  # The forward's group statistics take one shifted pass (layers._normalize_fwd_stats) where the plain formula
  # takes two: equal to rounding.
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), ours, ref):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err < tol, f"{name}: max error {err:.2e} of its scale"


def test_group_norm_statistics_survive_large_offsets():
  """Channels whose mean is 1e4 times their spread: one unshifted pass (E[x^2] - E[x]^2 in fp32) would lose the
  variance to cancellation; the shifted per-channel sums must still match float64 two-pass statistics."""
  r = np.random.default_rng(3)
  x = (1e3 + r.standard_normal((2, 9, 7, 12)) * 0.1 + 0.05 * r.standard_normal(12)).astype(np.float32)
  y = GroupNorm(3, 1e-6).apply({"params": {"scale": jnp.ones(12), "bias": jnp.zeros(12)}}, jnp.asarray(x))
  xg = x.astype(np.float64).reshape(2, -1, 3, 4)
  ref = ((xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, False), (True, False)])
def test_layer_norm_matches_autodiff(use_scale, use_bias):
  x, scale, bias, cot = _inputs((3, 7, 24), jnp.float32, seed=1)
  mod = LayerNorm(1e-5, use_bias=use_bias, use_scale=use_scale)
  params = {**({"scale": scale} if use_scale else {}), **({"bias": bias} if use_bias else {})}

  def ours(x, p):
    return mod.apply({"params": p}, x)

  def ref(x, p):
    return _plain_layer_norm(x, p.get("scale"), p.get("bias"), 1e-5, jnp.float32)

  out_a, pull_a = jax.vjp(ours, x, params)
  out_b, pull_b = jax.vjp(ref, x, params)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  (dx_a, dp_a), (dx_b, dp_b) = pull_a(cot), pull_b(cot)
  np.testing.assert_allclose(dx_a, dx_b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dx_b))))
  assert dp_a.keys() == dp_b.keys()
  for k in dp_a:
    np.testing.assert_allclose(dp_a[k], dp_b[k], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dp_b[k]))))


def test_group_norm_rejects_unknown_activation():
  with pytest.raises(ValueError, match="activation"):
    GroupNorm(2, activation="gelu").init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_matches_torch(dtype):
  """layers.gelu (fp32 erf, one rounding) against torch's exact GELU, tails included."""
  import torch
  from idmp_jax.models.layers import gelu
  x = np.concatenate([np.random.default_rng(5).standard_normal(4096) * 3.0, np.linspace(-12, 12, 97)])
  xt = torch.tensor(x, dtype=getattr(torch, dtype))
  ref = torch.nn.functional.gelu(xt).float().numpy()
  ours = gelu(jnp.asarray(xt.float().numpy(), dtype))
  assert ours.dtype == jnp.dtype(dtype)
  ours = np.asarray(ours, np.float32)
  if dtype == "float32":
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  else:  # At most one bf16 rounding step apart.
    np.testing.assert_allclose(ours, ref, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_geglu_matches_autodiff(dtype, tol):
  """layers.geglu's custom VJP (fp32 recompute from h) against autodiff of diffusers' formula."""
  from idmp_jax.models.layers import geglu
  r = np.random.default_rng(4)
  h = jnp.asarray(r.standard_normal((3, 5, 16)) * 2.0, dtype)
  cot = jnp.asarray(r.standard_normal((3, 5, 8)), dtype)

  def plain(h):
    value, gate = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return (value * jax.nn.gelu(gate, approximate=False)).astype(dtype)

  out, pull = jax.vjp(geglu, h)
  ref_out, ref_pull = jax.vjp(plain, h)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=tol, atol=tol)
  dh, ref = np.asarray(pull(cot)[0], np.float32), np.asarray(ref_pull(cot)[0], np.float32)
  assert dh.shape == h.shape
  assert np.max(np.abs(dh - ref)) / np.max(np.abs(ref)) < tol

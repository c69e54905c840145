"""The LoRA adapter's dropout glue as Pallas kernels (idmp_jax/models/pallas_lora.py), interpreted on the CPU,
against lora's XLA path: the same mask, the same [x | h], the same dx and dA; and the custom VJP through either."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import lora, pallas_lora


def _inputs(rows, k, r, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
  a = jnp.asarray(rng.standard_normal((k, r)) / r, dtype)
  return x, a, jnp.float32(0.25), jnp.asarray([12345, 678], jnp.uint32), jnp.float32(0.5)


def _close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("rows,k,r,dtype,tol", [
    (256, 192, 16, jnp.float32, 1e-5),   # two 128-row blocks, three column blocks
    (192, 128, 32, jnp.float32, 1e-5),   # 64-row blocks
    (128, 64, 16, jnp.bfloat16, 2e-2),   # the compute dtype of training
])
def test_kernels_equal_the_xla_path(rows, k, r, dtype, tol):
  x, a, rate, seed, scale = _inputs(rows, k, r, dtype)
  xd = lora._apply_dropout(x, rate, seed)
  zeros = float(jnp.mean(xd == 0))
  assert 0.15 < zeros < 0.35  # The rate is applied (0.25), so a kernel that ignored the mask would fail below.
  xh = pallas_lora.concat_down(x, a, rate, seed, scale, interpret=True)
  want_h = jnp.dot(xd, a) * scale.astype(dtype)
  assert xh.dtype == dtype
  np.testing.assert_array_equal(np.asarray(xh[:, :k], np.float32), np.asarray(x, np.float32))
  _close(xh[:, k:], want_h, tol)

  dxh = jnp.asarray(np.random.default_rng(1).standard_normal((rows, k + r)), dtype)
  dx, da = pallas_lora.backward(xh, dxh, a, rate, seed, scale, interpret=True)
  dh = dxh[:, k:] * scale.astype(dtype)
  _close(da, jnp.dot(xd.T, dh, preferred_element_type=jnp.float32), tol)
  _close(dx, dxh[:, :k] + lora._apply_dropout(jnp.dot(dh, a.T), rate, seed), tol)


def test_custom_vjp_through_the_kernels_equals_xla():
  rows, k, r, n = 128, 128, 16, 96
  x, a, rate, seed, scale = _inputs(rows, k, r, jnp.float32, seed=3)
  rng = np.random.default_rng(4)
  kernel = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
  b = jnp.asarray(rng.standard_normal((r, n)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)

  def loss(x, a, b, kernels):
    y = lora._lora_matmul(x, kernel, a, b, scale, rate, seed, True, kernels)
    return jnp.sum((y - target) ** 2), y

  (l0, y0), g0 = jax.value_and_grad(functools.partial(loss, kernels=False), argnums=(0, 1, 2), has_aux=True)(x, a, b)
  (l1, y1), g1 = jax.value_and_grad(functools.partial(loss, kernels=True), argnums=(0, 1, 2), has_aux=True)(x, a, b)
  _close(y1, y0, 1e-5)
  for got, want in zip(g1, g0):
    _close(got, want, 1e-4)


def test_dispatch_and_bad_shapes_are_named():
  assert not lora.use_kernels((256, 128), (128, 16), "auto")  # No GPU here: XLA.
  assert not lora.use_kernels((256, 128), (128, 16), "xla")
  assert lora.use_kernels((256, 128), (128, 16), "pallas")
  with pytest.raises(ValueError, match="outside what pallas_lora's kernels take"):
    lora.use_kernels((100, 128), (128, 16), "pallas")  # rows in no whole 64-row block
  assert not pallas_lora.supported(256, 100, 16) and not pallas_lora.supported(256, 128, 12)
  with pytest.raises(ValueError, match="outside what the kernels take"):
    pallas_lora.concat_down(jnp.ones((256, 100)), jnp.ones((100, 16)), 0.1, jnp.zeros(2, jnp.uint32), 1.0,
                            interpret=True)

"""The LoRA adapters' input side as Pallas kernels (idmp_jax/models/pallas_lora.py), interpreted on the CPU, against
lora's XLA path: the same masks, the same [x | h_1 | ... | h_n], dA and dx; and `lora._lora_matmuls` (values and
gradients) through either path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import lora, pallas_lora


def _inputs(rows, k, r, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
  a = tuple(jnp.asarray(rng.standard_normal((k, r)) / r, dtype) for _ in range(n))
  rates = tuple(jnp.float32(v) for v in (0.25, 0.05, 0.5, 0.1)[:n])
  seeds = tuple(jnp.asarray([12345 + 7 * i, 678 + i], jnp.uint32) for i in range(n))
  scales = tuple(jnp.float32(v) for v in (0.5, 1.0, 2.0, 0.25)[:n])
  return x, a, rates, seeds, scales


def _close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("rows,k,r,n,dtype,tol", [
    (256, 192, 16, 3, jnp.float32, 1e-5),   # two 128-row blocks, three 32-column tiles per half, q/k/v
    (192, 128, 32, 1, jnp.float32, 1e-5),   # 64-row blocks
    (128, 64, 16, 2, jnp.bfloat16, 2e-2),   # the compute dtype of training
])
def test_kernels_equal_the_xla_path(rows, k, r, n, dtype, tol):
  x, a, rates, seeds, scales = _inputs(rows, k, r, n, dtype)
  xds = [lora._apply_dropout(x, rate, seed) for rate, seed in zip(rates, seeds)]
  zeros = float(jnp.mean(xds[0] == 0))
  assert 0.2 < zeros < 0.3  # The rate is applied (0.25), so a kernel that ignored the mask would fail below.
  xh = pallas_lora.down(x, jnp.stack(a), rates, seeds, scales, interpret=True)
  assert xh.dtype == dtype and xh.shape == (rows, k + n * r)
  np.testing.assert_array_equal(np.asarray(xh[:, :k], np.float32), np.asarray(x, np.float32))
  for i in range(n):
    _close(xh[:, k + i * r:k + (i + 1) * r], jnp.dot(xds[i], a[i]) * scales[i].astype(dtype), tol)

  dh = jnp.asarray(np.random.default_rng(1).standard_normal((n, rows, r)), dtype)
  da = pallas_lora.down_grad(xh, dh, rates, seeds, k=k, interpret=True)
  assert da.shape == (n, k, r) and da.dtype == jnp.float32
  for i in range(n):
    _close(da[i], jnp.dot(xds[i].T, dh[i], preferred_element_type=jnp.float32), tol)

  dxhs = tuple(jnp.asarray(np.random.default_rng(2 + i).standard_normal((rows, k + r)), dtype) for i in range(n))
  dx = pallas_lora.up_grad(dxhs, jnp.stack(a), rates, seeds, scales, k=k, interpret=True)
  want = None
  for i in range(n):
    back = jnp.dot(dxhs[i][:, k:] * scales[i].astype(dtype), a[i].T)
    term = dxhs[i][:, :k] + lora._apply_dropout(back, rates[i], seeds[i])
    want = term if want is None else want + term
  assert dx.dtype == dtype
  _close(dx, want, tol)


def test_matmuls_through_the_kernels_equal_xla(monkeypatch):
  """The custom VJP with the kernels (forward operand and dA) against its XLA path: outputs and the x, A and B
  gradients of three adapters on one input, each with its own mask."""
  rows, k, r, n, out = 128, 128, 16, 3, 96
  x, a, rates, seeds, scales = _inputs(rows, k, r, n, jnp.float32, seed=3)
  rng = np.random.default_rng(4)
  kernels = tuple(jnp.asarray(rng.standard_normal((k, out)) / np.sqrt(k), jnp.float32) for _ in range(n))
  b = tuple(jnp.asarray(rng.standard_normal((r, out)), jnp.float32) for _ in range(n))
  targets = [jnp.asarray(rng.standard_normal((rows, out)), jnp.float32) for _ in range(n)]

  def loss(x, a, b):
    ys = lora._lora_matmuls(x, kernels, a, b, scales, rates, seeds, True)
    return sum(jnp.sum((y - t) ** 2) for y, t in zip(ys, targets)), ys

  results = {}
  for mode in ("xla", "interpret"):
    monkeypatch.setattr(lora, "KERNELS", mode)
    results[mode] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, a, b)
  (l0, y0), g0 = results["xla"]
  (l1, y1), g1 = results["interpret"]
  for got, want in zip(y1, y0):
    _close(got, want, 1e-5)
  for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    _close(got, want, 1e-4)
  assert not np.allclose(np.asarray(g0[1][0]), np.asarray(g0[1][1]))  # Distinct masks and inputs per adapter.


def test_kernel_path_is_taken_and_named(monkeypatch):
  a = (jnp.ones((128, 16)),) * 3
  assert not lora._use_kernels((256, 128), a, True)  # "auto" and no GPU here: XLA.
  monkeypatch.setattr(lora, "KERNELS", "interpret")
  assert lora._use_kernels((256, 128), a, True)
  assert not lora._use_kernels((256, 128), a, False)  # No dropout: no mask to make.
  assert not lora._use_kernels((100, 128), a, True)  # Rows in no whole 64-row block: XLA.
  assert not lora._use_kernels((256, 96), (jnp.ones((96, 16)),), True)  # K not a multiple of 64.
  assert not lora._use_kernels((256, 128), (jnp.ones((128, 16)), jnp.ones((128, 32))), True)  # Mixed ranks.
  monkeypatch.setattr(lora, "KERNELS", "triton")
  with pytest.raises(ValueError, match="lora.KERNELS"):
    lora._use_kernels((256, 128), a, True)
  assert not pallas_lora.supported(256, 100, 16) and not pallas_lora.supported(256, 128, 12)
  assert not pallas_lora.supported(256, 128, 16, 5)
  with pytest.raises(ValueError, match="outside what the kernels take"):
    pallas_lora.down(jnp.ones((256, 96)), jnp.ones((1, 96, 16)), (0.1,), (jnp.zeros(2, jnp.uint32),), (1.0,),
                     interpret=True)


@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 8), (64, 320)])
def test_dropout_mask_pairs_the_row_halves(shape):
  """The mask of `lora._apply_dropout`: one hash per (row, j) gives columns j (low 16 bits) and j + ceil(K/2) (high
  16 bits), for any K (odd too) and any leading axes (flattened)."""
  seed = jnp.asarray([3, 4], jnp.uint32)
  got = np.asarray(lora._apply_dropout(jnp.ones(shape, jnp.float32), jnp.float32(0.5), seed)) > 0
  k = shape[-1]
  half = -(-k // 2)
  rows = int(np.prod(shape[:-1]))
  pairs = jnp.arange(rows * half, dtype=jnp.uint32).reshape(rows, half)
  low, high = (np.asarray(v) for v in lora.keep_bits(pairs, lora.mixed_seed(seed)))
  want = np.concatenate([low, high], axis=1)[:, :k] >= 32768
  np.testing.assert_array_equal(got.reshape(rows, k), want)
  assert 0.3 < want.mean() < 0.7 or want.size < 64

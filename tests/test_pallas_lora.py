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


@pytest.mark.parametrize("rows,k,n,with_delta,dtype,tol", [
    (64, 320, 3, False, jnp.float32, 1e-5),   # the UNet's width (halves of 160 padded to 256), q/k/v after norm1
    (128, 128, 1, True, jnp.float32, 1e-5),   # q after norm2 (the residual add)
    (64, 192, 3, True, jnp.bfloat16, 2e-2),   # the compute dtype of training
])
def test_norm_kernels_equal_the_unfused_kernels(rows, k, n, with_delta, dtype, tol):
  """`norm_down` against `pallas_norm.forward` then `down`, and `norm_up_grad` against `up_grad` (or its XLA form for
  one adapter) then `pallas_norm.backward`, all interpreted: the same h, [y | h_1 | ... | h_n], statistics and dx."""
  from idmp_jax.models import pallas_norm
  r = 16
  x, a, rates, seeds, scales = _inputs(rows, k, r, n, dtype, seed=7)
  rng = np.random.default_rng(8)
  x = x * 3.0 + 1.5  # Statistics away from (0, 1), so a kernel that skipped the normalisation would fail.
  delta = jnp.asarray(rng.standard_normal((rows, k)), dtype) if with_delta else None
  ln_scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(k), jnp.float32)
  ln_bias = jnp.asarray(0.2 * rng.standard_normal(k), jnp.float32)
  h, xh, mean, rstd = pallas_lora.norm_down(x, delta, ln_scale, ln_bias, jnp.stack(a), rates, seeds, scales,
                                            eps=1e-5, interpret=True)
  h0, y0, mean0, rstd0 = pallas_norm.forward(x, delta, ln_scale, ln_bias, eps=1e-5, interpret=True)
  xh0 = pallas_lora.down(y0, jnp.stack(a), rates, seeds, scales, interpret=True)
  assert (h is None) == (not with_delta) and xh.shape == (rows, k + n * r) and xh.dtype == dtype
  if with_delta:
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h0, np.float32))
  _close(xh[:, :k], y0, tol)
  _close(xh, xh0, tol)
  _close(mean, mean0, 1e-5)
  _close(rstd, rstd0, 1e-5)
  assert float(jnp.std(xh[:, :k].astype(jnp.float32))) > 0.5  # y itself, not zeros.

  stream = x if h is None else h
  dxhs = tuple(jnp.asarray(rng.standard_normal((rows, k + r)), dtype) for _ in range(n))
  dstream = jnp.asarray(rng.standard_normal((rows, k)), dtype)
  dx = pallas_lora.norm_up_grad(dxhs, jnp.stack(a), rates, seeds, scales, stream, dstream, mean, rstd, ln_scale,
                                k=k, interpret=True)
  if n > 1:
    dy = pallas_lora.up_grad(dxhs, jnp.stack(a), rates, seeds, scales, k=k, interpret=True)
  else:
    dy = dxhs[0][:, :k] + lora._apply_dropout(jnp.dot(dxhs[0][:, k:] * scales[0].astype(dtype), a[0].T),
                                              rates[0], seeds[0])
  want = pallas_norm.backward(stream, dy, dstream, mean0, rstd0, ln_scale, interpret=True)
  assert dx.dtype == dtype
  _close(dx, want, tol)


def test_transformer_block_fuses_its_norms_with_the_adapters(monkeypatch):
  """The UNet's transformer block in training (LoRA with dropout), kernels interpreted: norm1 with self-attention's
  q/k/v adapters and norm2 with cross-attention's q adapter run as `normed_adapted_matmuls`, norm3 alone; output,
  loss gradients of the adapters and of the input equal the unfused kernels' (`lora.FUSE_NORM` off)."""
  import collections
  from idmp_jax.models import layers, unet
  from tests.conftest import pallas_calls
  block = unet.BasicTransformerBlock(dim=128, heads=2, upcast=False, attention_impl="xla", dtype=jnp.float32)
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((2, 64, 128)) * 2.0 + 0.5, jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
  params = block.init(jax.random.key(0), x, context)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  params = lora.init_lora(params, jax.random.key(1), rank=16, alpha=16, dropout=0.1)
  params = jax.tree.map(lambda p: p, params)
  adapters, frozen = lora.split(params)
  adapters = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), adapters)

  def loss(adapters, x):
    out = block.apply({"params": lora.merge(adapters, frozen)}, x, context,
                      rngs={lora.DROPOUT_RNG: jax.random.key(2)})
    return jnp.sum(jnp.sin(out))

  monkeypatch.setattr(lora, "KERNELS", "interpret")
  monkeypatch.setattr(layers, "NORM_KERNELS", "interpret")
  results = {}
  for fuse in (False, True):
    monkeypatch.setattr(lora, "FUSE_NORM", fuse)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    results[fuse] = grad(adapters, x)
    calls = collections.Counter(name for name, _ in pallas_calls(grad, adapters, x))
    fused = {"layer_norm_lora_down": 2, "layer_norm_lora_up_grad": 2} if fuse else {}
    assert {n: calls[n] for n in fused} == fused
    assert calls["layer_norm_forward"] == (1 if fuse else 3) and calls["layer_norm_backward"] == (1 if fuse else 3)
  for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  grads = results[True][1][0]
  assert float(jnp.abs(grads["attn1"]["to_q"]["lora_a"]).max()) > 0  # The fused path's dA reaches the adapters.

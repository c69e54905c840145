"""The GEGLU feed-forward (idmp_jax.models.layers.geglu_feed_forward): its XLA path and its Pallas kernels
(idmp_jax/models/pallas_geglu.py, interpreted on the CPU) against autodiff of the plain formula, values and the
gradients of the input and of all four weights, with each residual choice of the kernels (h kept or recomputed)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import layers, pallas_geglu
from tests.conftest import pallas_calls

SMALL = (64, 32, 32, 4, 2)  # (block_m, block_n, block_k, warps, stages): several blocks on each axis below.


@pytest.fixture
def small_kernels(monkeypatch):
  monkeypatch.setattr(pallas_geglu, "TILINGS", {"forward": SMALL, "backward": SMALL})
  monkeypatch.setattr(pallas_geglu, "MIN_ROWS", 64)


def test_erf_matches_lax():
  x = jnp.linspace(-7.0, 7.0, 400_001, dtype=jnp.float32)
  assert float(jnp.max(jnp.abs(pallas_geglu.erf(x) - jax.lax.erf(x)))) < 1e-6


def _plain(x, w1, b1, w2, b2):
  hf = (x @ w1 + b1).astype(jnp.float32)
  value, gate = jnp.split(hf, 2, axis=-1)
  y = (value * 0.5 * gate * (1.0 + jax.lax.erf(gate / np.sqrt(2.0)))).astype(x.dtype)
  return y @ w2 + b2


@pytest.mark.parametrize("mode,residual", [("xla", "h"), ("interpret", "h"), ("interpret", "x")])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_feed_forward_matches_autodiff(monkeypatch, small_kernels, mode, residual, dtype, tol):
  monkeypatch.setattr(layers, "GEGLU_KERNELS", mode)
  monkeypatch.setattr(layers, "GEGLU_RESIDUAL", residual)
  rng = np.random.default_rng(3)
  c, inner = 64, 96  # inner: three 32-column blocks of value and of gate.
  c_out = c if residual == "x" else 32  # Recomputing runs x's and dz's loops as one: the widths must agree.
  arr = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)
  x, cot = arr(2, 64, c), arr(2, 64, c_out)
  w1, b1 = arr(c, 2 * inner, scale=c ** -0.5), arr(2 * inner, scale=0.3)
  w2, b2 = arr(inner, c_out, scale=inner ** -0.5), arr(c_out, scale=0.3)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)
  fused = lambda *a: layers.geglu_feed_forward(*a, dtype)
  args = (x, w1, b1, w2, b2)
  got = (fused(*args), jax.grad(loss(fused), range(5))(*args))
  want = (_plain(*args), jax.grad(loss(_plain), range(5))(*args))
  calls = collections.Counter(name for name, _ in pallas_calls(jax.grad(loss(fused), range(5)), *args))
  assert calls == ({} if mode == "xla" else {"geglu_forward": 1, "geglu_backward": 1})
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_kernels_round_as_the_xla_path(small_kernels):
  """bf16: the forward's h is x w1 + b1 rounded once, y and dh within bf16 rounding of the unfused ops'."""
  rng = np.random.default_rng(4)
  arr = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, jnp.bfloat16)
  x, w1, b1, w2, dz = arr(128, 64), arr(64, 128, scale=0.125), arr(128, scale=0.3), arr(64, 64), arr(128, 64)
  y, h = pallas_geglu.forward(x, w1, b1, save=True, tiling=SMALL, interpret=True)
  want_h = (jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)).astype(jnp.bfloat16)
  f = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f(h), f(want_h), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(f(y), f(layers.geglu(h)), rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(f(pallas_geglu.forward(x, w1, b1, tiling=SMALL, interpret=True)), f(y))
  want_dh = jax.vjp(layers.geglu, h)[1](jnp.dot(dz, w2.T))[0]
  for dh in (pallas_geglu.backward(dz, w2, h=h, tiling=SMALL, interpret=True),
             pallas_geglu.backward(dz, w2, x=x, w=w1, b=b1, tiling=SMALL, interpret=True)):
    np.testing.assert_allclose(f(dh), f(want_dh), rtol=2e-2, atol=2e-2 * np.abs(f(want_dh)).max())


def test_bad_shapes_and_switches_are_refused(monkeypatch, small_kernels):
  x = jnp.ones((64, 64))
  with pytest.raises(ValueError, match="do not divide"):
    pallas_geglu.forward(x[:, :48], jnp.ones((48, 128)), jnp.ones(128), tiling=SMALL, interpret=True)
  with pytest.raises(ValueError, match="do not fit"):
    pallas_geglu.forward(x, jnp.ones((32, 128)), jnp.ones(128), tiling=SMALL, interpret=True)
  with pytest.raises(ValueError, match="do not fit"):
    pallas_geglu.backward(x, jnp.ones((64, 64)), tiling=SMALL, interpret=True)
  with pytest.raises(ValueError, match="geglu_feed_forward"):
    layers.geglu_feed_forward(x, jnp.ones((64, 100)), jnp.ones(100), jnp.ones((48, 8)), jnp.ones(8), jnp.float32)
  for name, value in (("GEGLU_KERNELS", "triton"), ("GEGLU_RESIDUAL", "y")):
    monkeypatch.setattr(layers, "GEGLU_KERNELS", "interpret")
    monkeypatch.setattr(layers, name, value)
    with pytest.raises(ValueError, match=f"layers.{name}"):
      layers.geglu_feed_forward(x, jnp.ones((64, 128)), jnp.ones(128), jnp.ones((64, 8)), jnp.ones(8), jnp.float32)


def test_transformer_block_through_the_kernels_equals_xla(monkeypatch, small_kernels):
  """The UNet's transformer block, its feed-forward through the kernels (interpreted) against XLA's path: output
  and the gradients of the input and of every weight, fp32. An adapted (LoRA) feed-forward keeps its modules."""
  from idmp_jax.models import lora, unet
  block = unet.BasicTransformerBlock(dim=64, heads=2, upcast=False, attention_impl="xla", dtype=jnp.float32)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 32, 64)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32)
  params = block.init(jax.random.key(0), x, context)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

  def loss(params, x):
    return jnp.sum(jnp.sin(block.apply(params, x, context)))

  results = {}
  for mode in ("xla", "interpret"):
    monkeypatch.setattr(layers, "GEGLU_KERNELS", mode)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    results[mode] = grad(params, x)
    calls = collections.Counter(name for name, _ in pallas_calls(grad, params, x))
    assert calls == ({} if mode == "xla" else {"geglu_forward": 1, "geglu_backward": 1})
  for got, want in zip(jax.tree.leaves(results["interpret"]), jax.tree.leaves(results["xla"])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  # LoRA on the feed-forward's projection: the module path (no kernels), as before.
  adapted = lora.init_lora(params["params"], jax.random.key(1), rank=4, alpha=4.0, targets=("proj",))
  assert lora.adapted_modules(params["params"], ("proj",)) == [("ff", "net_0", "proj")]
  calls = pallas_calls(jax.grad(loss), {"params": adapted}, x)
  assert "geglu_forward" not in {name for name, _ in calls}

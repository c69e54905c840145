"""The short-key cross-attention kernels (idmp_jax/models/pallas_cross_attention.py), interpreted on the CPU:
forward and gradients equal XLA's attention (`attention.dot_product_attention(..., implementation="xla")`) with
RCA-style masks (per example, shared by the batch, none, rows with no key allowed), key counts that are not powers
of two, several heads and query spans; bad inputs are refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import attention, pallas_cross_attention as pca
from tests.conftest import pallas_calls, rel_err

SMALL = (16, 2, 4, 2, 16, 2, 4, 2)  # 16-query tiles, two spans per (batch, head): loops, splits and partials run.


def _inputs(seed, b, t, s, n, h, dtype=jnp.float32, mask_batch=None, empty_rows=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.standard_normal((b, m, n, h)) * 1.5, dtype) for m in (t, s, s))
  mask = None
  if mask_batch is not None:
    m = r.uniform(size=(mask_batch, 1, t, s)) > 0.6
    m[:, :, :empty_rows] = False  # No key allowed: XLA averages all real keys there.
    mask = jnp.asarray(m)
  return q, k, v, mask


def _xla(q, k, v, mask):
  return attention.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation="xla")


def _pallas(config=SMALL):
  return lambda q, k, v, mask: pca.cross_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5, interpret=True,
                                                   config=config)


@pytest.mark.parametrize("s, mask_batch, config", [
    (77, 2, SMALL),      # An RCA mask per example; 77 keys: a 64 + 16 key tiling with 3 padding keys.
    (77, 1, SMALL),      # One mask for the whole batch (read from batch 0, not broadcast).
    (77, None, SMALL),   # No mask.
    (100, 2, None),      # 64 + 32 + 16 key tiles, the default config (one 48-query tile per program).
    (128, 2, SMALL),     # No padding at all.
])
def test_forward_equals_xla(s, mask_batch, config):
  q, k, v, mask = _inputs(s, 2, 48, s, 3, 16, mask_batch=mask_batch, empty_rows=5)
  ref = _xla(q, k, v, mask)
  ours = _pallas(config)(q, k, v, mask)
  assert ours.shape == ref.shape and ours.dtype == q.dtype
  assert rel_err(ours, ref) <= 1e-5


def test_forward_bf16_and_low_rank_mask():
  """bf16 inputs (probabilities rounded to bf16 before P @ V, as XLA does) and a (T, S) mask."""
  q, k, v, mask = _inputs(1, 2, 32, 78, 2, 32, dtype=jnp.bfloat16, mask_batch=1, empty_rows=3)
  ref = _xla(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
  ours = _pallas()(q, k, v, mask)
  assert ours.dtype == jnp.bfloat16 and rel_err(ours, ref) <= 1e-2
  ours_2d = _pallas()(q, k, v, mask[0, 0])
  assert rel_err(ours_2d, ours) == 0.0 and rel_err(ours_2d, _xla(q, k, v, mask[0, 0])) <= 1e-2


def test_rows_with_no_key_average_the_real_keys():
  """A query row whose keys are all masked gets the mean of v over the S real keys (not the padding, not NaN),
  as XLA's float32-min logits give; and no gradient reaches its q."""
  q, k, v, mask = _inputs(2, 1, 16, 77, 2, 16, mask_batch=1, empty_rows=16)
  out = _pallas()(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(v).mean(axis=1, keepdims=True), out.shape),
                             rtol=1e-5, atol=1e-6)
  dq = jax.grad(lambda q: jnp.sum(_pallas()(q, k, v, mask) ** 2))(q)
  assert float(jnp.max(jnp.abs(dq))) == 0.0


@pytest.mark.parametrize("mask_batch, config", [(2, SMALL), (None, SMALL), (2, (16, 1, 4, 2, 16, 1, 4, 2))])
def test_gradients_equal_xla(mask_batch, config):
  """dq, dk, dv against XLA's autodiff: partial dK/dV per split summed (SMALL), or written directly (one split)."""
  q, k, v, mask = _inputs(3, 2, 48, 77, 3, 16, mask_batch=mask_batch, empty_rows=4)
  ct = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
  ref = jax.vjp(lambda q, k, v: _xla(q, k, v, mask), q, k, v)[1](ct)
  ours = jax.vjp(lambda q, k, v: _pallas(config)(q, k, v, mask), q, k, v)[1](ct)
  for name, a, want in zip("qkv", ours, ref):
    assert a.shape == want.shape and a.dtype == want.dtype
    assert rel_err(a, want) <= 1e-4, name


def test_gradients_bf16():
  q, k, v, mask = _inputs(5, 2, 32, 77, 2, 32, dtype=jnp.bfloat16, mask_batch=2, empty_rows=2)
  ct = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.bfloat16)
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  ref = jax.vjp(lambda q, k, v: _xla(q, k, v, mask), *f32(q, k, v))[1](ct.astype(jnp.float32))
  ours = jax.vjp(lambda q, k, v: _pallas()(q, k, v, mask), q, k, v)[1](ct)
  for name, a, want in zip("qkv", ours, ref):
    assert a.dtype == jnp.bfloat16 and rel_err(a, want) <= 2e-2, name


def test_supported_and_refusals():
  q, k, v, mask = _inputs(7, 2, 32, 77, 2, 16, mask_batch=2)
  assert pca.supported(q.shape, k.shape)
  assert pca.supported((32, 4096, 5, 64), (32, 78, 5, 64))  # The UNet's first level.
  assert not pca.supported((2, 32, 2, 16), (2, 129, 2, 16))  # More keys than one tile.
  assert not pca.supported((2, 32, 2, 24), (2, 77, 2, 24))  # Head size not a power of two.
  assert not pca.supported((2, 40, 2, 16), (2, 77, 2, 16))  # T not a multiple of 16.
  assert not pca.supported((2, 32, 2, 16), (2, 77, 3, 16))  # Heads differ.
  assert pca._key_tiles(78) == ((0, 64), (64, 16)) and pca._key_tiles(128) == ((0, 128),)
  run = lambda *a, **kw: pca.cross_attention(*a, scale=0.25, interpret=True, **kw)
  long_k = jnp.zeros((2, 129, 2, 16))
  with pytest.raises(ValueError, match="outside"):
    run(q, long_k, long_k)
  with pytest.raises(ValueError, match="do not match"):
    run(q, k, v[:, :70])
  with pytest.raises(ValueError, match="dtypes"):
    run(q, k, v.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="mask dtype"):
    run(q, k, v, mask.astype(jnp.int32))
  with pytest.raises(ValueError, match="broadcastable"):
    run(q, k, v, jnp.ones((2, 2, 32, 77), bool))  # One mask per head: not what the kernel takes.
  with pytest.raises(ValueError, match="broadcastable"):
    run(q, k, v, mask[:, :, :16])
  with pytest.raises(ValueError, match="block_t"):
    run(q, k, v, mask, config=(24, 0, 4, 2, 64, 0, 4, 2))


def test_batch_shared_mask_read_in_place():
  """A mask shared by the batch goes to the kernels as (1, T, SP) (padded to the key tiles' 80 columns), not
  broadcast, and every program reads batch 0 of it (on the GPU a block index past it would read out of bounds; the
  interpreter clamps, so check the map)."""
  q, k, v, mask = _inputs(8, 3, 32, 77, 2, 16, mask_batch=1)
  fwd_bwd = lambda q, k, v: jax.vjp(lambda q, k, v: _pallas()(q, k, v, mask), q, k, v)[1](q)
  shapes = dict(pallas_calls(fwd_bwd, q, k, v))
  assert shapes["cross_attention_forward"][-1] == (1, 32, 80)
  assert shapes["cross_attention_backward"][-1] == (1, 32, 80)
  _, _, m_spec = pca._specs(q, k, mask.reshape(1, 32, 77), 16)
  assert m_spec.index_map(1, 1, 2) == (0, 1, 0)
  _, _, m_spec = pca._specs(q, k, jnp.ones((3, 32, 77), bool), 16)
  assert m_spec.index_map(1, 1, 2) == (2, 1, 0)


def test_dot_product_attention_dispatch():
  """`attention.dot_product_attention`: implementation="pallas" runs the kernel (interpreted here) for few keys and
  a mask shared by the heads, with XLA's output and gradients; a per-head mask, a causal call or many keys fall back
  to the auto choice (XLA on the CPU); "auto" never picks Pallas off GPU."""
  q, k, v, mask = _inputs(3, 2, 32, 77, 2, 16, mask_batch=2)
  calls = []
  kernel = pca.cross_attention
  run = lambda impl, m=mask, **kw: attention.dot_product_attention(q, k, v, mask=m, implementation=impl, **kw)
  try:
    pca.cross_attention = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    of_q = lambda impl: lambda q: attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out, pull = jax.vjp(of_q("pallas"), q)
    ref, ref_pull = jax.vjp(of_q("xla"), q)
    assert calls and rel_err(out, ref) <= 1e-5
    ct = jnp.asarray(np.random.default_rng(4).standard_normal(out.shape), out.dtype)
    assert rel_err(pull(ct)[0], ref_pull(ct)[0]) <= 1e-4
    calls.clear()
    per_head = jnp.broadcast_to(mask, (2, 2, 32, 77))
    assert rel_err(run("pallas", per_head), run("xla", per_head)) <= 1e-6 and not calls
    causal = run("pallas", None, is_causal=True)
    assert rel_err(causal, run("xla", None, is_causal=True)) <= 1e-6 and not calls
    run("auto")
    assert not calls
  finally:
    pca.cross_attention = kernel
  assert attention.resolve_implementation("auto", jnp.bfloat16, 16, q.shape, k.shape) == "xla"  # No GPU here.
  long_keys = (2, 160, 2, 16)
  assert attention.resolve_implementation("pallas", jnp.bfloat16, 16, q.shape, long_keys) == "xla"

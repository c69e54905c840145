"""The int8 decode matmul kernel (idmp_jax/models/pallas_gemv.py), interpreted on the CPU, against the dequantised
kernel's float matmul; its weight convert (the bit trick) against a plain cast; quantize.matmul's dispatch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import pallas_convert, pallas_gemv, quantize
from idmp_jax.models.layers import Linear


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bit_trick_convert_is_exact_for_every_int8(dtype):
  w = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
  got = pallas_convert.convert_bits(w, dtype)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(-128, 128).reshape(16, 16))


def _kernel(rng, k, n):
  q, s = quantize.quantize_kernel(rng.standard_normal((k, n)).astype(np.float32))
  return jnp.asarray(q), jnp.asarray(s)


@pytest.mark.parametrize("lead,config", [
    ((4,), pallas_gemv.Config(64, 64, 1, False, "cast")),      # one split: the scale applied in the kernel
    ((1,), pallas_gemv.Config(64, 64, 3, False, "bits")),      # 6 K tiles over 3 splits
    ((2, 2), pallas_gemv.Config(128, 64, 4, False, "asm")),    # 6 tiles over 4 uneven splits; asm -> bits here
    ((3,), pallas_gemv.Config(64, 128, 2, True, "bits")),      # W^T x^T
    ((16,), pallas_gemv.Config(64, 64, 2, False, "cast")),     # the most rows the kernel takes
])
def test_gemv_equals_dequantised_matmul(lead, config):
  rng = np.random.default_rng(len(lead) + config.splits)
  k, n = 384, 256
  q, s = _kernel(rng, k, n)
  x = jnp.asarray(rng.standard_normal(lead + (k,)), jnp.float32)
  got = pallas_gemv.gemv(x, q, s, config=config, interpret=True)
  want = np.asarray(x) @ (np.asarray(q, np.float32) * np.asarray(s))
  assert got.shape == lead + (n,) and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_gemv_bad_inputs_and_tilings_are_named():
  rng = np.random.default_rng(0)
  q, s = _kernel(rng, 128, 128)
  x = jnp.ones((2, 128), jnp.float32)
  with pytest.raises(ValueError, match="do not match"):
    pallas_gemv.gemv(x, q.astype(jnp.int32), s, interpret=True)
  with pytest.raises(ValueError, match="outside what config"):
    pallas_gemv.gemv(jnp.ones((17, 128)), q, s, config=pallas_gemv.Config(64, 64), interpret=True)
  with pytest.raises(ValueError, match="outside what config"):
    pallas_gemv.gemv(x, q, s, config=pallas_gemv.Config(96, 64), interpret=True)
  with pytest.raises(ValueError, match="convert"):
    pallas_gemv.gemv(x, q, s, config=pallas_gemv.Config(64, 64, convert="fast"), interpret=True)


def test_measured_table_can_keep_xla_for_a_shape(monkeypatch):
  monkeypatch.setattr(pallas_gemv, "CONFIGS", {})
  pallas_gemv.set_configs({"256,512": [128, 64, 2, False, "cast", 4, 3], "512,256": None})
  assert pallas_gemv.default_config(256, 512) == pallas_gemv.Config(128, 64, 2, False, "cast", 4, 3)
  assert pallas_gemv.supported(4, 256, 512) and not pallas_gemv.supported(4, 512, 256)
  assert not pallas_gemv.supported(17, 256, 512)  # More rows than the kernel pads to: XLA.
  for bad in ({"256x512": None}, {"256,512": [128, 64, 2, False, "cast", 4, 3, 9]}, {"1,2": [64, 64, 1, 0, "x"]}):
    with pytest.raises(ValueError, match="tiling table: entry"):
      pallas_gemv.set_configs(bad)
  assert len(pallas_gemv.CONFIGS) == 2  # Unchanged by the refused tables.


def test_quantized_matmul_and_linear_dispatch():
  rng = np.random.default_rng(1)
  k, n = 256, 384
  q, s = _kernel(rng, k, n)
  x = jnp.asarray(rng.standard_normal((2, 1, k)), jnp.float32)
  xla = quantize.matmul(x, q, s, jnp.float32, "xla")
  np.testing.assert_allclose(np.asarray(quantize.matmul(x, q, s, jnp.float32, "pallas")), np.asarray(xla),
                             rtol=1e-5, atol=1e-5 * float(jnp.abs(xla).max()))
  np.testing.assert_array_equal(np.asarray(quantize.matmul(x, q, s, jnp.float32)), np.asarray(xla))  # CPU: XLA.
  with pytest.raises(ValueError, match="implementation 'triton'"):
    quantize.matmul(x, q, s, jnp.float32, "triton")
  q4, s4 = quantize.quantize_kernel(np.asarray(q, np.float32), bits=4, group_size=64)
  with pytest.raises(ValueError, match="per-column int8"):  # Grouped int4 has no Pallas kernel: said, not ignored.
    quantize.matmul(x, jnp.asarray(q4), jnp.asarray(s4), jnp.float32, "pallas")
  # A Linear over an int8 kernel runs the kernel it is told to (the model's layers pass "auto" or "xla").
  params = {"kernel": q, "kernel_scale": s}
  out = Linear(n, use_bias=False, quantized_matmul="pallas").apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(xla), rtol=1e-5, atol=1e-5 * float(jnp.abs(xla).max()))

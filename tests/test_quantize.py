"""int8 Linear kernels (idmp_jax/models/quantize.py): stored (out, in), the matmul and a Linear over them equal to
the dequantised kernel's float matmul, LoRA beside them shaped by their logical (in, out); the int8 convert's bit
trick (pallas_convert, used by the decode attention kernel) against a plain cast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import lora, pallas_convert, quantize
from idmp_jax.models.layers import Linear


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bit_trick_convert_is_exact_for_every_int8(dtype):
  w = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
  got = pallas_convert.convert_bits(w, dtype)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.arange(-128, 128).reshape(16, 16))


def test_int8_kernel_is_stored_out_in_and_multiplies_as_dequantised():
  rng = np.random.default_rng(0)
  k, n = 384, 256
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[:, 3] = 0.0  # An all-zero channel keeps scale 1.
  q, s = quantize.quantize_kernel(w)
  assert q.dtype == np.int8 and q.shape == (n, k) and s.shape == (n,) and s[3] == 1.0
  assert quantize.kernel_in_out(q) == (k, n) and quantize.kernel_in_out(w) == (k, n)
  deq = np.asarray(quantize.dequantize_kernel(jnp.asarray(q), jnp.asarray(s)))
  assert deq.shape == (k, n) and np.all(np.abs(deq - w) <= s / 2 + 1e-6)
  for lead in [(4,), (2, 3)]:
    x = jnp.asarray(rng.standard_normal(lead + (k,)), jnp.float32)
    got = quantize.matmul(x, jnp.asarray(q), jnp.asarray(s), jnp.float32)
    want = np.asarray(x) @ deq
    assert got.shape == lead + (n,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="int8 kernels take one scale per output channel"):
    quantize.quantize_kernel(w, bits=8, group_size=64)


def test_linear_over_int8_tree_and_lora_beside_it():
  rng = np.random.default_rng(1)
  k, n = 96, 160
  params = {"kernel": rng.standard_normal((k, n)).astype(np.float32), "bias": rng.standard_normal(n).astype(np.float32)}
  q = quantize.quantize_int8({"dense": params}, lambda p: True)
  x = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.float32)
  layer = Linear(n)
  got = layer.apply({"params": q["dense"]}, x)
  want = layer.apply({"params": quantize.dequantize(q)["dense"]}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match="does not map 96 inputs to 128 outputs"):
    Linear(128).apply({"params": q["dense"]}, x)
  # A LoRA adapter initialised over the int8 tree is shaped by the kernel's logical (in, out), and adds to it.
  adapted = lora.init_lora(q, jax.random.key(0), rank=4, alpha=4, targets=("dense",))["dense"]
  assert adapted["lora_a"].shape == (k, 4) and adapted["lora_b"].shape == (4, n)
  adapted["lora_b"] = jnp.ones((4, n), jnp.float32)
  delta = layer.apply({"params": adapted}, x) - got
  want_delta = jnp.dot(jnp.dot(x, adapted["lora_a"]), adapted["lora_b"]) * adapted["lora_scale"]
  np.testing.assert_allclose(np.asarray(delta), np.asarray(want_delta), rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(want_delta).max()))

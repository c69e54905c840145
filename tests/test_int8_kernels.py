"""The Pallas decode kernels for int8 weights and the int8 KV cache (idmp_jax/models/int8_kernels.py), run
interpreted on the CPU: each equals its XLA counterpart, and a Llama decode through them equals the XLA decode."""
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import attention, int8_kernels, llama, quantize
from tests.conftest import rel_err


@pytest.fixture
def kernels_mode():
  """Restores the process-wide kernel mode and tuning after a test changes them."""
  yield
  int8_kernels.set_mode("off")
  int8_kernels.set_tuning({})


@pytest.mark.parametrize("config", [None, ("dot", 64, 128, 4, 3), ("fma", 128, 32, 8, 3), ("fma", 256, 16, 4, 2)])
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_gemv_equals_dequantised_matmul(config, rows):
  r = np.random.default_rng(rows)
  q, s = quantize.quantize_kernel(r.standard_normal((256, 512)).astype(np.float32))
  x = jnp.asarray(r.standard_normal((rows, 256)), jnp.float32)
  ours = int8_kernels.gemv(x, jnp.asarray(q), jnp.asarray(s), config=config, interpret=True)
  ref = np.asarray(x) @ (q.astype(np.float32) * s)
  assert ours.shape == (rows, 512) and ours.dtype == jnp.float32 and rel_err(ours, ref) <= 1e-5
  xb = x.astype(jnp.bfloat16)  # bf16 in, bf16 out: one rounding of the fp32 sum.
  ours = int8_kernels.gemv(xb, jnp.asarray(q), jnp.asarray(s), config=config, interpret=True)
  assert ours.dtype == jnp.bfloat16 and rel_err(ours, np.asarray(xb, np.float32) @ (q * s)) <= 4e-3


def test_gemv_rejects_what_it_cannot_tile():
  q, s = jnp.zeros((256, 512), jnp.int8), jnp.ones((512,), jnp.float32)
  with pytest.raises(ValueError, match="does not tile"):
    int8_kernels.gemv(jnp.ones((2, 256)), q, s, config=("dot", 48, 128, 4, 3), interpret=True)
  with pytest.raises(ValueError, match="does not tile"):  # fma keeps one accumulator per row: at most 8 rows.
    int8_kernels.gemv(jnp.ones((9, 256)), q, s, config=("fma", 128, 32, 4, 3), interpret=True)
  with pytest.raises(ValueError, match="outside"):
    int8_kernels.gemv(jnp.ones((17, 256)), q, s, interpret=True)
  with pytest.raises(ValueError, match="do not match"):
    int8_kernels.gemv(jnp.ones((2, 128)), q, s, interpret=True)
  assert not int8_kernels.supported((17, 256), (256, 512)) and int8_kernels.supported((4, 256), (256, 512))


@pytest.mark.parametrize("config", [(1, 256, 4, 2), (3, 64, 4, 2), (8, 32, 4, 2)])
def test_decode_attention_equals_xla(config):
  """Grouped heads, masked keys (a whole masked tail, so some splits see no key), a length no tile divides."""
  r = np.random.default_rng(config[0])
  b, n, nk, s, h = 2, 4, 2, 300, 32
  q = jnp.asarray(r.standard_normal((b, 1, n, h)), jnp.float32)
  (k, ks), (v, vs) = (quantize.quantize_vectors(jnp.asarray(r.standard_normal((b, nk, s, h)) * 2)) for _ in "kv")
  valid = r.uniform(size=(b, s)) > 0.3
  valid[:, 0], valid[0, 150:] = True, False
  ref = attention.decode_attention_int8(q, k, v, ks, vs, mask=jnp.asarray(valid)[:, None, None, :])
  ours = int8_kernels.decode_attention(q, k, v, ks, vs, jnp.asarray(valid), scale=h ** -0.5, config=config,
                                       interpret=True)
  assert ours.shape == ref.shape and rel_err(ours, ref) <= 1e-5


def _kernel_calls(fn, *args) -> dict:
  """How many times each Pallas kernel runs in fn, by walking its jaxpr (nested calls included)."""
  counts = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        name = eqn.params["name"]
        counts[name] = counts.get(name, 0) + 1
        continue
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if isinstance(sub, jex.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def _tiny_int8_llama():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
  model = llama.LlamaForCausalLM(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)  # Logits far from uniform.
  return cfg, model, quantize.quantize_int8(jax.device_get(params), lambda p: "layers" in "/".join(p))


def test_llama_decode_through_the_kernels_equals_xla(kernels_mode):
  """Prefill (XLA: 7 rows of prompt) then decode steps (the kernels: one row each) with int8 weights and an int8
  cache give the XLA decode's logits; the kernels really run (pallas_call in the traced step), and a tuning
  table entry "xla" sends that shape back to XLA."""
  cfg, model, params = _tiny_int8_llama()
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 60, (3, 10)))

  def decode():  # A fresh function per mode: JAX reuses a function's trace, and the mode is read when tracing.
    def run(params):
      cache = llama.init_cache(cfg, 3, 24, jnp.int8)
      logits, cache = model.apply({"params": params}, ids[:, :7], cache=cache)
      outs = [logits]
      for t in range(7, 10):
        logits, cache = model.apply({"params": params}, ids[:, t:t + 1], cache, method="decode_step")
        outs.append(logits)
      return jnp.concatenate(outs, 1)
    return run

  ref = jax.jit(decode())(params)
  int8_kernels.set_mode("interpret")
  calls = _kernel_calls(decode(), params)
  layers = cfg.num_hidden_layers
  assert calls == {"int8_gemv_dot": 3 * 7 * layers, "int8_decode_attention": 3 * layers}, calls
  ours = jax.jit(decode())(params)
  assert rel_err(ours, ref) <= 1e-5 and float(jnp.max(jnp.abs(ref[:, 7:] - ref[:, 6:7]))) > 0.1
  int8_kernels.set_tuning({"gemv": {"64,128": ["xla"]}, "attention": ["xla"]})  # gate and up back on XLA.
  assert _kernel_calls(decode(), params) == {"int8_gemv_dot": 3 * 5 * layers}


def test_mode_is_validated(kernels_mode):
  with pytest.raises(ValueError, match="int8 kernels mode"):
    int8_kernels.set_mode("on")
  with pytest.raises(ValueError, match="attention_splits"):
    int8_kernels.set_mode("auto", 0)
  int8_kernels.set_mode("auto")  # On the CPU "auto" means XLA.
  assert int8_kernels.enabled() == (jax.default_backend() == "gpu", False)

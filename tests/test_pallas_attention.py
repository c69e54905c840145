"""The int8-cache decode attention kernel (idmp_jax/models/pallas_attention.py), interpreted on the CPU: it equals
XLA's int8 decode attention, through `attention.decode_attention_int8`'s dispatch and inside a Llama decode."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idmp_jax.models import attention, llama, pallas_attention, quantize
from tests.conftest import pallas_calls, rel_err


def _cache(r, b, nk, s, h):
  return (quantize.quantize_vectors(jnp.asarray(r.standard_normal((b, nk, s, h)) * 2)) for _ in "kv")


@pytest.mark.parametrize("config", [None, (1, 256, 4, 2), (3, 64, 4, 2, "cast"), (8, 32, 4, 2, "bits"),
                                    (16, 64, 2, 3, "asm")])
def test_kernel_equals_xla(config):
  """Grouped heads, masked keys (a whole masked tail, so some splits see no key), a length no tile divides."""
  r = np.random.default_rng(0 if config is None else config[0])
  b, n, nk, s, h = 2, 4, 2, 300, 32
  q = jnp.asarray(r.standard_normal((b, 1, n, h)), jnp.float32)
  (k, ks), (v, vs) = _cache(r, b, nk, s, h)
  valid = r.uniform(size=(b, s)) > 0.3
  valid[:, 0], valid[0, 150:] = True, False
  ref = attention.decode_attention_int8(q, k, v, ks, vs, mask=jnp.asarray(valid)[:, None, None, :],
                                        implementation="xla")
  ours = pallas_attention.decode_attention(q, k, v, ks, vs, jnp.asarray(valid), scale=h ** -0.5, config=config,
                                           interpret=True)
  assert ours.shape == ref.shape and ours.dtype == q.dtype and rel_err(ours, ref) <= 1e-5
  qb = q.astype(jnp.bfloat16)  # bf16 queries (rounded) and output: the bf16 parity bound.
  ours = pallas_attention.decode_attention(qb, k, v, ks, vs, jnp.asarray(valid), scale=h ** -0.5, config=config,
                                           interpret=True)
  assert ours.dtype == jnp.bfloat16 and rel_err(ours, ref) <= 1e-2


@pytest.mark.parametrize("config", [None, (1, 64, 4, 2, "cast"), (3, 32, 4, 2, "bits")])
def test_update_kernel_equals_xla(config, monkeypatch):
  """A decode step's write-and-attend (`attention.decode_attention_int8_update`): the kernel (its new key and
  value written in place and attended from registers; interpreted) gives XLA's output and the very same cache,
  at a slot inside a split, at a split's first slot, at the last slot and past it (clamped), with stale data at
  the slot before."""
  r = np.random.default_rng(7)
  b, n, nk, s, h = 2, 4, 2, 96, 32
  (k, ks), (v, vs) = _cache(r, b, nk, s, h)
  cache = (k, v, ks, vs)
  q, k_new, v_new = (jnp.asarray(r.standard_normal((b, 1, m, h)) * 2, jnp.float32) for m in (n, nk, nk))
  kernel = pallas_attention.decode_attention
  monkeypatch.setattr(pallas_attention, "decode_attention",
                      lambda *a, **kw: kernel(*a, **{**kw, "config": config}))
  for slot in (50, 32, s - 1, s + 3):  # The last: out of range, clamped to the last slot as XLA's write is.
    valid = jnp.asarray(np.arange(s) <= slot)[None, None, None, :]  # Keys up to this step's own.
    run = lambda impl: attention.decode_attention_int8_update(q, k_new, v_new, cache, jnp.int32(slot), mask=valid,
                                                              implementation=impl)
    (ref, ref_cache), (ours, our_cache) = run("xla"), run("pallas")
    assert ours.shape == ref.shape and rel_err(ours, ref) <= 1e-5
    for a, want in zip(our_cache, ref_cache):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(want))
    written = min(slot, s - 1)
    assert not np.array_equal(np.asarray(ref_cache[0][:, :, written]), np.asarray(k[:, :, written]))  # Written.


def test_dispatch():
  """implementation="pallas" (interpreted off GPU) equals "xla", with a mask broadcast over rows or none; "auto"
  on the CPU is XLA; a bad name or a shape the kernel does not take is refused."""
  r = np.random.default_rng(5)
  b, n, s, h = 3, 2, 40, 16
  q = jnp.asarray(r.standard_normal((b, 1, n, h)), jnp.float32)
  (k, ks), (v, vs) = _cache(r, b, n, s, h)
  for mask in (None, jnp.asarray(np.arange(s) < 30)[None, None, None, :]):
    run = lambda impl: attention.decode_attention_int8(q, k, v, ks, vs, mask=mask, implementation=impl)
    assert rel_err(run("pallas"), run("xla")) <= 1e-5
    assert jnp.array_equal(run("auto"), run("xla"))
  with pytest.raises(ValueError, match="implementation"):
    attention.decode_attention_int8(q, k, v, ks, vs, implementation="cudnn")
  assert pallas_attention.supported(q.shape, k.shape)
  assert not pallas_attention.supported(q.shape, k[:, :, :8].shape)  # fewer than 16 slots
  assert not pallas_attention.supported((b, 1, n, 24), (b, n, s, 24))  # head size not a power of two
  with pytest.raises(ValueError, match="outside"):
    pallas_attention.decode_attention(q[..., :8], k[..., :8], v[..., :8], ks, vs, jnp.ones((b, s), bool),
                                      scale=1.0, interpret=True)
  assert pallas_attention.default_config(4, 32) == (16, 64, 2, 3, "asm")  # The tiling measured fastest (H200, b4).
  assert pallas_attention.default_config(32, 32) == (16, 64, 2, 3, "asm")  # Fastest of the sweep at b32.
  assert pallas_attention.supported((4, 1, 32, 128), (4, 32, 3064, 128))  # Measured faster: batch 4 of the 7B.
  assert pallas_attention.supported((32, 1, 32, 128), (32, 32, 3064, 128))  # And batch 32.
  assert not pallas_attention.supported((4, 2, 32, 128), (4, 32, 3064, 128))  # Two queries: not a decode step.
  assert not attention.triton_gpu()  # On this CPU.


def test_pallas_kernels_only_by_default_on_one_device(monkeypatch):
  """"auto" takes the Pallas kernels on a Triton GPU only when one device runs the program: a pallas_call has no
  partitioning rule, so under a multi-device mesh XLA would gather its operands whole onto every device."""
  monkeypatch.setattr(attention, "triton_gpu", lambda: True)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert attention.pallas_by_default()
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert not attention.pallas_by_default()
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64, (2, 4096, 5, 64), (2, 77, 5, 64)) != "pallas"
  monkeypatch.setattr(attention, "triton_gpu", lambda: False)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert not attention.pallas_by_default()


def _kernel_calls(fn, *args) -> dict:
  """How many times each Pallas kernel runs in fn."""
  return dict(collections.Counter(name for name, _ in pallas_calls(fn, *args)))


def test_llama_decode_through_the_kernel_equals_xla(monkeypatch):
  """A Llama with int8 weights and an int8 cache: prefill, then decode steps whose attention is the kernel (the
  GPU's "auto" choice, made to run here interpreted) give the XLA decode's logits; attention_impl="xla" keeps
  the decode on XLA."""
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
  params = llama.LlamaForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)  # Logits far from uniform.
  params = quantize.quantize_int8(jax.device_get(params), lambda p: "layers" in "/".join(p))
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 60, (3, 10)))

  def decode(implementation):  # A fresh function each time: JAX reuses a function's trace.
    model = llama.LlamaForCausalLM(cfg, implementation=implementation)

    def run(params):
      cache = llama.init_cache(cfg, 3, 24, jnp.int8)
      logits, cache = model.apply({"params": params}, ids[:, :7], cache=cache)
      outs = [logits]
      for t in range(7, 10):
        logits, cache = model.apply({"params": params}, ids[:, t:t + 1], cache, method="decode_step")
        outs.append(logits)
      return jnp.concatenate(outs, 1)
    return run

  ref = jax.jit(decode("auto"))(params)  # On the CPU: XLA.
  kernel = pallas_attention.decode_attention
  monkeypatch.setattr(attention, "pallas_by_default", lambda: True)
  monkeypatch.setattr(pallas_attention, "decode_attention", lambda *a, **kw: kernel(*a, **{**kw, "interpret": True}))
  assert _kernel_calls(decode("auto"), params) == {"int8_decode_attention": 3 * cfg.num_hidden_layers}
  assert _kernel_calls(decode("xla"), params) == {}
  ours = jax.jit(decode("auto"))(params)
  assert rel_err(ours, ref) <= 1e-5 and float(jnp.max(jnp.abs(ref[:, 7:] - ref[:, 6:7]))) > 0.1

"""Attention for the whole project, and regional cross-attention (RCA).

`dot_product_attention` is the one function every model calls; on GPU (half precision) it dispatches attention
over few keys (the UNet's cross-attention over 77 text tokens) to a Pallas kernel (`pallas_cross_attention`),
the rest to cuDNN's fused kernel, and everything to XLA elsewhere. `Attention` is diffusers' `Attention` (to_q/to_k/to_v/to_out.0) with an
optional boolean mask, which is how RCA enters: `rca_mask` turns the per-example region masks and the region
index of each text token into a (batch, 1, h*w, tokens) boolean mask shared by all heads. Nothing per-head and
nothing float is materialised for RCA.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from idmp_jax.models import lora, quantize
from idmp_jax.models.layers import Linear, resize_nearest_torch

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


@functools.lru_cache(maxsize=None)
def _backend() -> str:
  return jax.default_backend()


@functools.lru_cache(maxsize=None)
def triton_gpu() -> bool:
  """A CUDA GPU that Pallas' Triton backend compiles for (compute capability 8.0 or newer)."""
  if _backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return tuple(int(x) for x in str(cc).split(".")[:2]) >= (8, 0)
  except ValueError:  # ROCm, or no capability reported.
    return False


def pallas_by_default() -> bool:
  """Where "auto" picks this project's Pallas kernels (here, `lora`, `layers`): a Triton GPU, one device in all. A
  pallas_call has no partitioning rule, so under a multi-device mesh XLA would gather each operand whole onto every
  device and run the kernel on the full batch there; XLA's own ops, and cuDNN's attention (which JAX partitions),
  shard by the batch. Asked for explicitly, the kernels still run."""
  return triton_gpu() and jax.device_count() == 1


def resolve_implementation(implementation: str, dtype, head_dim: int, q_shape=None, k_shape=None) -> str:
  """'auto' -> 'pallas' on a Triton GPU for fp16/bf16 attention over few keys that
  `pallas_cross_attention.supported` takes (given the shapes: the UNet's cross-attention over 77 text tokens),
  else 'cudnn' on GPU for fp16/bf16 with a head size cuDNN takes, else 'xla'. 'pallas' asked for explicitly runs the
  Pallas kernel where it is supported (interpreted off GPU) and resolves as 'auto' elsewhere. Without shapes (a
  causal call, or a mask that differs per head) there is no Pallas choice."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if implementation in ("auto", "pallas") and q_shape is not None and k_shape is not None:
    from idmp_jax.models import pallas_cross_attention  # Local import: Pallas only where it is used.
    if pallas_cross_attention.supported(q_shape, k_shape) and (
        implementation == "pallas" or (pallas_by_default() and half)):
      return "pallas"
  if implementation not in ("auto", "pallas"):
    return implementation
  if _backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
    return "cudnn"
  return "xla"


def dot_product_attention(q, k, v, *, mask=None, scale: Optional[float] = None, is_causal: bool = False,
                          implementation: str = "auto"):
  """softmax(q k^T * scale, masked) v.

  q: (B, T, N, H); k, v: (B, S, N, H); mask: boolean, True = may attend, broadcastable to (B, N, T, S).
  Logits and softmax are in fp32 on the XLA path (the reference computes them in its compute dtype; fp32 is the
  parity target and costs little here).
  """
  shared_mask = mask is None or (mask.dtype == jnp.bool_ and mask.ndim == 4 and mask.shape[1] == 1)
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1],
                                q.shape if shared_mask and not is_causal else None, k.shape)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if impl == "pallas":
    from idmp_jax.models import pallas_cross_attention
    return pallas_cross_attention.cross_attention(q, k, v, mask, scale=scale, interpret=not triton_gpu())
  if impl == "cudnn":
    t = q.shape[1]
    if mask is not None and (t % 2 or k.shape[1] % 2):
      q, k, v, mask = pad_to_even_lengths(q, k, v, mask)
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                          implementation="cudnn")[:, :t]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                        implementation="cudnn")
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), bool), k=s - t)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


DECODE_INT8_IMPLEMENTATIONS = ("auto", "xla", "pallas")


def decode_attention_int8(q, k, v, k_scale, v_scale, *, mask=None, scale: Optional[float] = None,
                          implementation: str = "auto"):
  """One query per row over an int8 KV cache (`idmp_jax.models.quantize.quantize_vectors` per cached vector).

  q: (B, 1, N, H); k, v: (B, Nk, S, H) int8, heads-major as the cache keeps them (Nk divides N: grouped-query
  heads share kv head n // (N / Nk), as transformers' repeat_kv); k_scale, v_scale: (B, Nk, S); mask: boolean,
  broadcastable to (B, 1, 1, S). Equals `dot_product_attention` on the dequantised k and v, but the scales are
  applied to the logits (per key) and to the probabilities (per value) instead of to the cache, and the cache is
  read once, as int8, with no dequantised copy written.
  implementation: "xla" (both contractions as multiply-and-reduce: XLA fuses the int8 -> fp32 convert into each
  reduction), "pallas" (`pallas_attention.decode_attention`: one kernel with an online softmax; interpreted off
  GPU), or "auto" (pallas on a CUDA GPU of compute capability >= 8.0 for the shapes it takes, where it measured
  faster: `pallas_attention.supported`; else xla).
  """
  kernel = _int8_kernel(implementation, q, k, mask, scale)
  if kernel:
    return kernel(q, k, v, k_scale, v_scale)
  b, _, n, h = q.shape
  nk, s = k.shape[1], k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  qf = q.reshape(b, nk, n // nk, h).astype(jnp.float32) * scale                        # (B, Nk, G, H)
  logits = jnp.sum(qf[:, :, :, None, :] * k[:, :, None].astype(jnp.float32), axis=-1)  # (B, Nk, G, S)
  logits = logits * k_scale[:, :, None]
  if mask is not None:
    m = jnp.broadcast_to(mask, mask.shape[:-2] + (1, s))[..., 0, :]  # (B|1, 1, S)
    logits = jnp.where(m[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1) * v_scale[:, :, None]
  out = jnp.sum(probs[..., None] * v[:, :, None].astype(jnp.float32), axis=3)           # (B, Nk, G, H)
  return out.reshape(b, 1, n, h).astype(q.dtype)


def _int8_kernel(implementation: str, q, k, mask, scale):
  """The Pallas kernel as a function of (q, k, v, k_scale, v_scale, **kw) where `implementation` picks it, else
  None (XLA)."""
  if implementation not in DECODE_INT8_IMPLEMENTATIONS:
    raise ValueError(f"int8 decode attention implementation {implementation!r}: expected one of "
                     f"{DECODE_INT8_IMPLEMENTATIONS}")
  from idmp_jax.models import pallas_attention  # Local import: Pallas only where it is used.
  gpu = triton_gpu()
  auto = implementation == "auto" and pallas_by_default() and pallas_attention.supported(q.shape, k.shape)
  if not (implementation == "pallas" or auto):
    return None
  b, s = q.shape[0], k.shape[2]
  valid = jnp.ones((b, s), bool) if mask is None else jnp.broadcast_to(mask, (b, 1, 1, s))[:, 0, 0]
  return functools.partial(pallas_attention.decode_attention, valid=valid, interpret=not gpu,
                           scale=q.shape[-1] ** -0.5 if scale is None else scale)


def decode_attention_int8_update(q, k_new, v_new, cache, slot, *, mask=None, scale: Optional[float] = None,
                                 implementation: str = "auto"):
  """A decode step's attention over the int8 KV cache, its own key and value written into the cache first.

  q: (B, 1, N, H); k_new, v_new: (B, 1, Nk, H) float (RoPE applied); cache: (k, v, k_scale, v_scale) as
  `decode_attention_int8` takes them; slot: () int32, where this step's key and value go (the mask must let each
  row see that slot: its own key). Returns (out (B, 1, N, H), updated cache). Either way the new vectors are
  quantised by `quantize.quantize_vectors`; then "xla" writes them with dynamic-update-slices and runs
  `decode_attention_int8`, and the Pallas kernel ("pallas", or "auto" where `decode_attention_int8` would use it)
  writes them itself, in place, and attends to them from registers: the same values, fewer passes."""
  # Both quantised as one (2, B, Nk, H) array: one reduction pass, and the kernel reads its halves in place.
  kv, kv_scale = quantize.quantize_vectors(jnp.stack([k_new[:, 0], v_new[:, 0]]))
  kernel = _int8_kernel(implementation, q, cache[0], mask, scale)
  if kernel:
    return kernel(q, *cache, new=(kv, kv_scale, slot))
  put = lambda a, new: jax.lax.dynamic_update_slice(a, new[:, :, None].astype(a.dtype), (0, 0, slot, 0)[:a.ndim])
  cache = tuple(put(a, new) for a, new in zip(cache, (kv[0], kv[1], kv_scale[0], kv_scale[1])))
  return decode_attention_int8(q, *cache, mask=mask, scale=scale, implementation="xla"), cache


def pad_to_even_lengths(q, k, v, mask):
  """Odd query/key lengths padded by one, for cuDNN's training kernel, which takes a mask (it becomes a bias) only
  with even lengths (77 text tokens in cross-attention). Added keys are masked out; an added query row sees every
  key (so no row is empty) and its output is dropped by the caller. Returns (q, k, v, mask (B|1, N|1, T', S'))."""
  t, s = q.shape[1], k.shape[1]
  pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n), (0, 0), (0, 0)))
  mask = jnp.broadcast_to(mask, mask.shape[:-2] + (t, s))
  lead = [(0, 0)] * (mask.ndim - 2)
  mask = jnp.pad(mask, lead + [(0, 0), (0, s % 2)], constant_values=False)
  mask = jnp.pad(mask, lead + [(0, t % 2), (0, 0)], constant_values=True)
  return pad(q, t % 2), pad(k, s % 2), pad(v, s % 2), mask


def rca_mask(region_masks, token_region, height: int, width: int):
  """The RCA attention mask at one feature-map resolution (SPEC §3).

  region_masks: (B, R, H0, W0) in {0, 1} (region 0 = everywhere), at the layout resolution (the image, 512x512);
    resized to (height, width) with PyTorch's `nearest` rule straight from the layout, never chained.
  token_region: (B, S) int, the region each text token belongs to (0 for BOS/EOS/padding).
  Returns a boolean (B, 1, height*width, S): query position p may attend token t iff
  region_masks[token_region[t]] is 1 at p.
  """
  rm = resize_nearest_torch(region_masks, (height, width), axes=(2, 3))
  b, r = rm.shape[:2]
  rm = rm.reshape(b, r, height * width) > 0.5
  per_token = jnp.take_along_axis(rm, token_region.astype(jnp.int32)[:, :, None], axis=1)  # (B, S, HW)
  return jnp.swapaxes(per_token, 1, 2)[:, None]


class Attention(nn.Module):
  """diffusers' Attention without its processor variety: projections, heads, optional mask.

  `mask` is boolean, broadcastable to (B, heads, query_len, key_len); RCA passes `rca_mask(...)` here.
  """
  heads: int
  dim_head: int
  out_dim: Optional[int] = None
  qkv_bias: bool = False
  upcast: bool = False  # diffusers' upcast_attention: q and k in fp32 (our XLA path already softmaxes in fp32).
  implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    b = x.shape[0]
    if context is x and lora.shares_input(self, ("to_q", "to_k", "to_v")):
      q, k, v = lora.adapted_matmuls(self, ("to_q", "to_k", "to_v"), x)  # Self-attention: adapters on one x.
    else:
      q = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
      k = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
      v = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
    q = q.reshape(b, -1, self.heads, self.dim_head)
    k = k.reshape(b, -1, self.heads, self.dim_head)
    v = v.reshape(b, -1, self.heads, self.dim_head)
    impl = self.implementation
    if self.upcast:
      q, k, impl = q.astype(jnp.float32), k.astype(jnp.float32), "xla"
      v = v.astype(jnp.float32)
    out = dot_product_attention(q, k, v, mask=mask, implementation=impl).astype(self.dtype)
    out = out.reshape(b, -1, inner)
    return Linear(self.out_dim or x.shape[-1], dtype=self.dtype, name="to_out_0")(out)

"""int8 -> float inside Pallas (Triton) GPU kernels by a bit trick instead of conversion instructions.

A plain int8 -> fp32 convert runs on the SM's conversion unit, a quarter of the fp32 rate (16 a clock on Hopper);
a kernel that converts every byte it streams (the int8 KV cache in decode attention) can be bound by it. The trick
uses full-rate integer and fp32 units only: the byte b = s + 128 (the int8 s with its sign bit flipped) placed
in the low mantissa bits of 2^23 reads 2^23 + b as fp32 (one byte permute), and subtracting 2^23 + 128 leaves s
exactly; the bf16 of such a small integer is the fp32's high half (one more permute per two values).

  "cast"  w.astype(dtype): the conversion instructions
  "bits"  the trick in jax.numpy (integer add and bitcasts): runs anywhere, interpreted kernels included
  "asm"   the trick in PTX, four values per instance: GPU only (kernels fall back to "bits" when interpreted)
All three are exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

CONVERTS = ("cast", "bits", "asm")

_MAGIC = 0x4B000080  # 2^23 + 128 as fp32 bits.
_MAGIC_F = 8388736.0  # 2^23 + 128.

# $4 (or $2): four int8 in one b32 register. Out: four fp32 ($0-$3), or four bf16 two to a register ($0, $1).
_UNPACK = """xor.b32 u, {src}, 0x80808080;
prmt.b32 f0, u, 0x4B000000, 0x7540;
prmt.b32 f1, u, 0x4B000000, 0x7541;
prmt.b32 f2, u, 0x4B000000, 0x7542;
prmt.b32 f3, u, 0x4B000000, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;"""
_ASM_F32 = ("{\n.reg .b32 u, f0, f1, f2, f3;\n" + _UNPACK.format(src="$4")
            + "\nmov.b32 $0, f0;\nmov.b32 $1, f1;\nmov.b32 $2, f2;\nmov.b32 $3, f3;\n}")
_ASM_BF16 = ("{\n.reg .b32 u, f0, f1, f2, f3;\n" + _UNPACK.format(src="$2")
             + "\nprmt.b32 $0, f0, f1, 0x7632;\nprmt.b32 $1, f2, f3, 0x7632;\n}")


def resolve(how: str, interpret: bool, where: str) -> str:
  """A kernel's convert choice checked (named by `where` when it is not one of CONVERTS), "asm" taken as "bits"
  when the kernel is interpreted (PTX does not interpret; "bits" is the same arithmetic)."""
  if how not in CONVERTS:
    raise ValueError(f"{where}: convert {how!r}, expected one of {CONVERTS}")
  return "bits" if interpret and how == "asm" else how


def convert_bits(w, dtype):
  """int8 -> `dtype` by the trick in jax.numpy."""
  f = jax.lax.bitcast_convert_type(w.astype(jnp.int32) + _MAGIC, jnp.float32) - _MAGIC_F
  return f.astype(dtype)


def int8_to(w, dtype, how: str):
  """An int8 array (inside a kernel) as `dtype` (fp32 or bf16 for "asm"; any float dtype otherwise)."""
  if how not in CONVERTS:
    raise ValueError(f"int8 convert {how!r}: expected one of {CONVERTS}")
  dtype = jnp.dtype(dtype)
  if how == "cast" or (how == "asm" and dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))):
    return w.astype(dtype)
  if how == "bits":
    return convert_bits(w, dtype)
  asm, constraints = ((_ASM_F32, "=r,=r,=r,=r,r") if dtype == jnp.float32 else (_ASM_BF16, "=r,=r,r"))
  [out] = plgpu.elementwise_inline_asm(asm, args=[w], constraints=constraints, pack=4,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, dtype)])
  return out

"""A step's device kernels summed by the model code they come from: the profiler's trace joined to the compiled
step's optimized HLO (each kernel's HLO instruction -> its `op_name` metadata, the JAX/Flax call path).

  python benchmarks/profile_by_source.py TRACE.json.gz STEP.hlo.txt [STEPS]

`benchmarks/train_step.py --profile DIR` writes both (the HLO as `step.hlo.txt` beside the trace) and prints this
summary. Each kernel is put under (direction, module, kind): direction "bwd" where its op_name passes through
`transpose(...)` (JAX's backward), module the Flax module path with block indices dropped (down_blocks_0/
attentions_1/.../attn1/to_q -> attentions/transformer_blocks/attn1/to_q), kind as profile_summary's (attention,
convolution, matmul, fusion/other). Kernels whose instruction is not found in the HLO (library kernels without an
HLO op in the trace, the optimizer's, ...) are listed as unjoined by name.
"""
from __future__ import annotations

import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profile_summary import device_events, kind_of, load_trace  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?metadata=\{[^}]*?op_name="([^"]*)"')
_WRAPPER = re.compile(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint|custom_vjp_call|custom_jvp_call)\b|\(")


def _norm(name: str) -> str:
  """XLA names kernels after their instruction with '.' and '-' made '_'."""
  return re.sub(r"[.\-]", "_", name)


def op_names(hlo_text: str) -> dict[str, str]:
  """{normalised instruction name: op_name} for every instruction of an HLO module's text that has one."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      out.setdefault(_norm(m.group(1)), m.group(2))
  return out


def source_of(op_name: str) -> tuple[str, str]:
  """(direction, module path, its last 6 levels) of a JAX op_name."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if p and not _WRAPPER.search(p)]
  # The last part is the primitive. Block indices are dropped below the UNet's levels (down_blocks_N / up_blocks_N
  # stay: they say the resolution).
  modules = [p if re.fullmatch(r"(down|up)_blocks_\d+", p) else re.sub(r"_\d+$", "", p) for p in parts[:-1]]
  path = "/".join(modules[-6:]) or "(top)"
  return direction, path


def kernel_op_name(event: dict, names: dict[str, str]) -> tuple[str | None, bool]:
  """(op_name, exact) of a kernel event. Exact: a kernel launched on its own carries its HLO op (`hlo_op`), whose
  op_name the HLO's metadata gives. Inside a CUDA graph (XLA's command buffers) `hlo_op` is the command
  buffer, so the kernel's own name is looked up in the HLO instead; that is approximate, as XLA names a kernel
  after the first of the identical fusions that share it (profile with --xla_gpu_enable_command_buffer= for an
  exact split)."""
  args = event.get("args") or {}
  op = _norm(str(args.get("hlo_op", "")).lstrip("%"))
  if op in names:
    return names[op], True
  if "/" in str(args.get("name", "")):  # (The trace's own op_name is bare "jit(step)" for some fusions.)
    return args["name"], True
  name = _norm(event.get("name", ""))
  return names.get(name), False


def summarize(events: list[dict], hlo_text: str, steps: int, top: int = 45) -> dict:
  names = op_names(hlo_text)
  by_source, by_module, by_leaf_kind, unjoined = (collections.Counter() for _ in range(4))
  joined_us = total_us = exact_us = 0.0
  for e in device_events(events):
    us = float(e["dur"])
    total_us += us
    op_name, exact = kernel_op_name(e, names)
    if op_name is None:
      unjoined[e.get("name", "")[:90]] += us
      continue
    joined_us += us
    exact_us += us if exact else 0.0
    direction, path = source_of(op_name)
    by_source[(direction, path, kind_of(e.get("name", "")))] += us
    leaf = "/".join(path.split("/")[-2:])
    by_module[(direction, leaf)] += us
    by_leaf_kind[(direction, leaf, kind_of(e.get("name", "")))] += us
  ms = lambda us: round(us / steps / 1e3, 3)
  return {"kernel_ms_per_step": ms(total_us), "joined_ms_per_step": ms(joined_us), "exact_ms_per_step": ms(exact_us),
          "by_source": [(d, p, k, ms(us)) for (d, p, k), us in by_source.most_common(top)],
          "by_module": [(d, p, ms(us)) for (d, p), us in by_module.most_common(top)],
          "by_module_kind": [(d, p, k, ms(us)) for (d, p, k), us in by_leaf_kind.most_common(top)],
          "unjoined": [(n, ms(us)) for n, us in unjoined.most_common(12)]}


def print_summary(s: dict) -> None:
  print(f"kernels {s['kernel_ms_per_step']} ms a step, {s['joined_ms_per_step']} ms joined to the HLO's op_names "
        f"({s['exact_ms_per_step']} ms exactly, by the kernel's own HLO op)")
  print("  by module (last two levels), both kinds:")
  for d, p, v in s["by_module"]:
    print(f"    {v:8.3f} ms  {d}  {p}")
  print("  by module (last two levels) and kernel kind:")
  for d, p, k, v in s["by_module_kind"]:
    print(f"    {v:8.3f} ms  {d}  {k:14s} {p}")
  print("  by source and kernel kind:")
  for d, p, k, v in s["by_source"]:
    print(f"    {v:8.3f} ms  {d}  {k:14s} {p}")
  print("  not joined:")
  for n, v in s["unjoined"]:
    print(f"    {v:8.3f} ms  {n}")


def profile_by_source(trace_path: str, hlo_path: str, steps: int) -> dict:
  with open(hlo_path, encoding="utf-8") as f:
    summary = summarize(load_trace(trace_path), f.read(), steps)
  print_summary(summary)
  return summary


if __name__ == "__main__":
  profile_by_source(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)

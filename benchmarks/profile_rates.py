"""How far each kernel of a profiled step is from a hardware rate: the profiler's trace joined to the step's
optimized HLO (as `profile_by_source.py`), then per HLO instruction

  convolution   TFLOP/s from its shapes (forward: output x input channels x window; data gradient likewise),
  matmul        TFLOP/s and TB/s (operands + output bytes) from its shapes,
  fusion/other  its bytes (operands + outputs) against a streaming floor (--bandwidth TB/s; the H200's XLA copy
                ran 3.3-3.6), summed by model source: what a faster kernel could still win, as opposed to what
                only removing passes can.

  python benchmarks/profile_rates.py TRACE.json.gz STEP.hlo.txt [--steps 3] [--top 25]

`bash benchmarks/device_runs.sh final` writes both (without CUDA graphs, so every kernel names its instruction).
Durations include programmatic-dependent-launch waits: small kernels launched before their predecessor ends
count the overlap, so sub-10-us kernels read slower than they run.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import profile_by_source as pbs  # noqa: E402
from benchmarks.profile_summary import device_events, kind_of, load_trace  # noqa: E402

_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "pred": 1, "u8": 1, "s8": 1, "u16": 2, "u32": 4, "s32": 4}
_ARRAY = re.compile(r"\b(bf16|f16|f32|pred|u8|s8|u16|u32|s32)\[([\d,]*)\]")
_LINE = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*?)\)(?:,|$)")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(text)]


def _nbytes(text: str) -> int:
  total = 0
  for t, dims in _arrays(text):
    n = 1
    for d in dims:
      n *= d
    total += n * _BYTES[t]
  return total


def instructions(hlo_text: str) -> dict[str, dict]:
  """{normalised name: {op_name, target, out, operands (their shapes' text), window}} for the entry computation."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  shapes, out = {}, {}
  for line in entry.splitlines():
    m = _LINE.match(line)
    if not m:
      continue
    name, shape, _, operands = m.groups()
    shapes[name] = shape
    ops = [o.strip().lstrip("%") for o in operands.split(",") if o.strip().startswith("%")]
    on = re.search(r'op_name="([^"]*)"', line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    window = re.search(r"window=\{size=(\d+)x(\d+)", line)
    out[pbs._norm(name)] = dict(op_name=on.group(1) if on else "", target=target.group(1) if target else "",
                                out=shape, operands=[shapes.get(o, "") for o in ops],
                                window=(int(window.group(1)), int(window.group(2))) if window else (1, 1))
  return out


def conv_flops(inst: dict) -> int:
  """2 x output positions x Cout x Cin x window for a cuDNN forward or data-gradient convolution (NHWC)."""
  outs, ins = _arrays(inst["out"]), _arrays(inst["operands"][0]) if inst["operands"] else []
  if not outs or not ins:
    return 0
  o, x = outs[0][1], ins[0][1]
  kh, kw = inst["window"]
  if "Backward" in inst["target"]:  # out = dx (N, H, W, Cin); operand 0 = dy (N, H', W', Cout).
    return 2 * x[0] * x[1] * x[2] * x[3] * o[3] * kh * kw
  return 2 * o[0] * o[1] * o[2] * o[3] * x[3] * kh * kw


def matmul_flops(inst: dict) -> int:
  """2 M N K, K read off the first operand (its elements / M): the GEMMs here contract one dimension."""
  outs = _arrays(inst["out"])
  ins = _arrays(inst["operands"][0]) if inst["operands"] else []
  if not outs or not ins:
    return 0
  o = outs[0][1]
  m = 1
  for d in o[:-1]:
    m *= d
  a = 1
  for d in ins[0][1]:
    a *= d
  return 2 * m * o[-1] * (a // m if m else 0)


def rates(trace_path: str, hlo_path: str, steps: int, bandwidth_tbs: float) -> dict:
  with open(hlo_path, encoding="utf-8") as f:
    insts = instructions(f.read())
  per_op = collections.defaultdict(lambda: collections.Counter())
  for e in device_events(load_trace(trace_path)):
    op = pbs._norm(str((e.get("args") or {}).get("hlo_op", "")).lstrip("%"))
    if op in insts:
      kind = kind_of(e.get("name", ""))
      per_op[op][kind] += float(e["dur"])
      per_op[op]["calls:" + kind] += 1
  convs, gemms, glue = [], [], collections.defaultdict(lambda: [0.0, 0.0])
  for op, c in per_op.items():
    inst = insts[op]
    d, path = pbs.source_of(inst["op_name"])
    where = f"{d} {'/'.join(path.split('/')[-3:])}"
    total = sum(v for k, v in c.items() if not k.startswith("calls:"))
    us = total / steps
    # Each instruction runs once a step (no loops in these steps), whatever number of kernels it launches.
    if c["convolution"]:
      convs.append((us, conv_flops(inst) / (us * 1e6), where))
    elif "fmha" in inst["target"]:  # cuDNN attention: some of its kernels have GEMM-like names.
      continue
    elif c["matmul"]:
      nbytes = _nbytes(inst["out"]) + sum(_nbytes(s) for s in inst["operands"])
      gemms.append((us, matmul_flops(inst) / (us * 1e6), nbytes / (us * 1e6), where))
    elif c["fusion/other"] and not inst["target"]:
      nbytes = _nbytes(inst["out"]) + sum(_nbytes(s) for s in inst["operands"])
      glue[where][0] += us
      glue[where][1] += nbytes / (bandwidth_tbs * 1e6)
  return {"convs": convs, "gemms": gemms, "glue": glue}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace")
  p.add_argument("hlo")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--bandwidth", type=float, default=3.3, help="streaming floor for the glue, TB/s")
  args = p.parse_args(argv)
  r = rates(args.trace, args.hlo, args.steps, args.bandwidth)
  conv_us = sum(us for us, _, _ in r["convs"])
  conv_tflop = sum(tf * us for us, tf, _ in r["convs"]) / 1e6  # TFLOP/s x us = 1e6 FLOP... in TFLOP a step.
  print(f"convolutions: {conv_us / 1e3:.2f} ms a step, {conv_tflop / conv_us * 1e6 if conv_us else 0:.0f} TFLOP/s "
        "overall; the top by time:")
  for us, tf, where in sorted(r["convs"], reverse=True)[:args.top]:
    print(f"  {us / 1e3:7.3f} ms {tf:6.0f} TFLOP/s  {where}")
  gemm_us = sum(g[0] for g in r["gemms"])
  print(f"GEMMs: {gemm_us / 1e3:.2f} ms a step; the top by time:")
  for us, tf, tb, where in sorted(r["gemms"], reverse=True)[:args.top]:
    print(f"  {us / 1e3:7.3f} ms {tf:6.0f} TFLOP/s {tb:5.2f} TB/s  {where}")
  total = sum(v[0] for v in r["glue"].values())
  floor = sum(v[1] for v in r["glue"].values())
  print(f"glue (XLA fusions): {total / 1e3:.2f} ms a step against {floor / 1e3:.2f} ms of bytes at "
        f"{args.bandwidth} TB/s; by source, most above its floor:")
  for where, (us, fl) in sorted(r["glue"].items(), key=lambda kv: kv[1][1] - kv[1][0])[:args.top]:
    print(f"  {(us - fl) / 1e3:7.3f} ms over  {us / 1e3:7.3f} ms  (floor {fl / 1e3:6.3f})  {where}")


if __name__ == "__main__":
  main()

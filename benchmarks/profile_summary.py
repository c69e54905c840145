"""Where a jitted step's device time and memory go: run it under jax.profiler and sum the kernels of the trace by
kind; the compiled step's own memory estimate and the process's peak (`executable_gib`, `peak_memory_gib`).

  from benchmarks.profile_summary import profile_steps
  summary = profile_steps(lambda: step(...), steps=3, log_dir="/tmp/prof")   # prints a table, returns a dict

  python benchmarks/profile_summary.py TRACE.json.gz     # the table for a perfetto trace written earlier

The trace is JAX's perfetto export (`create_perfetto_trace=True`): Chrome trace events, one complete event ("ph":
"X") per kernel on the device's streams (per XLA op on the host for a CPU run). Kernels are put in kinds by name:
attention (cuDNN flash/SDPA), convolution (cuDNN conv: fprop, dgrad), matmul (cuBLAS/cuBLASLt/nvjet, Triton and
cutlass GEMMs), copies and collectives, and everything else (XLA's fused elementwise and reduction kernels: norms,
activations, the optimizer). Times are per step: the trace's total divided by the steps run under it.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys

KINDS = (  # first match wins; names lower-cased
    ("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn_generated_fort_native")),
    ("convolution", re.compile(r"fprop|dgrad|wgrad|implicit_gemm|convolution")),  # not "conv": XLA's "convert"
    ("matmul", re.compile(r"gemm|nvjet|cublas|cutlass|matmul|dot")),
    ("copy/collective", re.compile(r"memcpy|memset|copy|nccl|all-reduce|all-gather|transpose")),
)


def executable_gib(compiled) -> float | None:
  """XLA's memory estimate of one compiled step (arguments + outputs + temporaries - donated): the step's own
  footprint, which the process-wide peak (monotone over a run) cannot isolate."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2 ** 30


def peak_memory_gib() -> float | None:
  """The device's peak bytes in use so far in this process (None where the backend keeps no statistics)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2 ** 30 if stats else None


def kind_of(name: str) -> str:
  low = name.lower()
  for kind, pattern in KINDS:
    if pattern.search(low):
      return kind
  return "fusion/other"


def load_trace(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict]) -> list[dict]:
  """Complete events of the kernels: on a GPU trace the device process's "Stream #..." threads (its "XLA Modules"
  and "XLA Ops" lines repeat the same time and are left out); on a CPU-only trace the XLA runtime's threads
  (Python's own thread is left out)."""
  meta = lambda kind: {(e.get("pid"), e.get("tid")) if kind == "thread_name" else e.get("pid"):
                       e.get("args", {}).get("name", "") for e in events
                       if e.get("ph") == "M" and e.get("name") == kind}
  processes, threads = meta("process_name"), meta("thread_name")
  gpu = {pid for pid, n in processes.items() if re.search(r"gpu|cuda", n.lower())}
  if gpu:
    keep = {k for k, n in threads.items() if k[0] in gpu and "stream" in n.lower()}
    if not keep:  # Unknown thread naming: every device line except XLA's per-module/per-op summaries.
      keep = {k for k, n in threads.items() if k[0] in gpu and "xla" not in n.lower()}
  else:
    keep = {k for k, n in threads.items() if n != "python"}
  return [e for e in events if e.get("ph") == "X" and "dur" in e and (e.get("pid"), e.get("tid")) in keep]


def timeline(kernels: list[dict], gap_us: float = 5.0) -> dict:
  """Where the device is idle between kernels (one stream's view; overlapping kernels count once): span from the
  first kernel's start to the last one's end, busy time (the union of the kernels' intervals), idle = span -
  busy, and the idle gaps longer than `gap_us` with the kernel each one precedes (what waited). Microseconds."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in kernels)
  if not spans:
    return {"span_us": 0.0, "busy_us": 0.0, "gaps": []}
  busy, end, gaps = 0.0, spans[0][0], []
  for start, stop, name in spans:
    if start > end:
      if start - end > gap_us:
        gaps.append((start - end, name))
    busy += max(0.0, stop - max(start, end))
    end = max(end, stop)
  return {"span_us": end - spans[0][0], "busy_us": busy, "gaps": gaps}


def summarize(events: list[dict], steps: int, top: int = 20) -> dict:
  by_name = collections.Counter()
  count = collections.Counter()
  kernels = device_events(events)
  line = timeline(kernels)
  waits = collections.Counter()
  for us, name in line["gaps"]:
    waits[name] += us
  for e in kernels:
    by_name[e["name"]] += float(e["dur"])  # microseconds
    count[e["name"]] += 1
  total = sum(by_name.values())
  by_kind = collections.Counter()
  for name, us in by_name.items():
    by_kind[kind_of(name)] += us
  per_step = lambda us: round(us / steps / 1e3, 3)  # ms per step
  return {
      "steps": steps, "kernel_ms_per_step": per_step(total),
      "span_ms_per_step": per_step(line["span_us"]), "idle_ms_per_step": per_step(line["span_us"] - line["busy_us"]),
      "gaps_over_5us_per_step": len(line["gaps"]) / steps,
      "gap_ms_per_step": per_step(sum(us for us, _ in line["gaps"])),
      "waits": [{"before": n[:120], "ms_per_step": per_step(us)} for n, us in waits.most_common(5)],
      "kinds": {k: {"ms_per_step": per_step(us), "share": round(us / total, 3) if total else 0.0}
                for k, us in by_kind.most_common()},
      "top": [{"name": n[:120], "kind": kind_of(n), "ms_per_step": per_step(us), "calls_per_step": count[n] / steps}
              for n, us in by_name.most_common(top)],
  }


def print_summary(s: dict) -> None:
  print(f"device kernels: {s['kernel_ms_per_step']} ms per step (sum over kernels; overlap not removed)")
  print(f"timeline: {s['span_ms_per_step']} ms per step from the first kernel to the last, idle "
        f"{s['idle_ms_per_step']} ms; {s['gaps_over_5us_per_step']:g} gaps over 5 us a step "
        f"({s['gap_ms_per_step']} ms), longest waits before: "
        + ", ".join(f"{w['before'][:40]} {w['ms_per_step']} ms" for w in s["waits"][:3]))
  for kind, v in s["kinds"].items():
    print(f"  {kind:16s} {v['ms_per_step']:9.2f} ms  {100 * v['share']:5.1f}%")
  print("  top kernels:")
  for t in s["top"]:
    print(f"    {t['ms_per_step']:8.2f} ms  x{t['calls_per_step']:<6g} {t['kind']:14s} {t['name']}")


def find_trace(log_dir: str) -> str:
  found = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f"{log_dir}: no perfetto_trace.json.gz written by jax.profiler")
  return found[-1]


def profile_steps(run_step, steps: int, log_dir: str, top: int = 20, steps_per_call: int = 1) -> dict:
  """Runs `run_step()` (which must block until its outputs are ready) `steps` times under the profiler; times are
  per step, counting `steps_per_call` steps in each call (e.g. a decode loop of many tokens)."""
  import jax
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(steps):
      run_step()
  path = find_trace(log_dir)
  summary = dict(summarize(load_trace(path), steps * steps_per_call, top), trace=path)
  print_summary(summary)
  return summary


if __name__ == "__main__":
  print_summary(summarize(load_trace(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1))

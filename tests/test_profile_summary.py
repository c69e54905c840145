"""benchmarks/profile_summary.py's timeline: idle time and gaps between device kernels."""
from benchmarks.profile_summary import summarize, timeline


def _kernel(ts, dur, name):
  return {"ph": "X", "pid": 1, "tid": 2, "ts": ts, "dur": dur, "name": name}


def test_timeline_counts_overlap_once_and_names_what_waited():
  ks = [_kernel(0, 10, "a"), _kernel(5, 10, "b"), _kernel(30, 5, "c"), _kernel(37, 3, "d"), _kernel(38, 1, "e")]
  line = timeline(ks)
  assert line == {"span_us": 40.0, "busy_us": 23.0, "gaps": [(15.0, "c")]}  # d's 2 us gap is under 5 us.
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #1"}}]
  s = summarize(meta + ks, steps=1)
  assert s["span_ms_per_step"] == 0.04 and s["idle_ms_per_step"] == 0.017 and s["gaps_over_5us_per_step"] == 1
  assert s["waits"] == [{"before": "c", "ms_per_step": 0.015}] and s["kernel_ms_per_step"] == 0.029

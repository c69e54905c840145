"""Loop plumbing shared by training jobs: reading step metrics one step late, the NaN guard, logging, progress.

Reading a step's loss on the host waits for that step. `StepMetrics` reads step k's metrics only after step k+1
has been dispatched (lag 1), so the device never idles on the host, yet a non-finite loss is seen one step later
at most. Before any checkpoint the loop calls `drain()`, which reads everything pending: a checkpoint is written
only once every loss before it was checked finite, so a NaN never reaches the last good checkpoint.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax

from idmp_jax.train.metrics import Progress


# Sizes a step may report (`idmp_jax.train.state`), logged as rates: examples/s, and tokens/s for text models.
COUNTS = ("examples", "tokens")


class NonFiniteLossError(FloatingPointError):
  """A NaN/inf loss or gradient norm: names the step and the batch; no checkpoint was written for it."""

  def __init__(self, step: int, what: dict, batch_info: dict, last_checkpoint):
    self.step, self.batch_info, self.last_checkpoint = step, batch_info, last_checkpoint
    values = ", ".join(f"{k} = {v}" for k, v in what.items())
    super().__init__(f"non-finite {values} at step {step} ({', '.join(f'{k} {v}' for k, v in batch_info.items())})"
                     f"; training stopped, the last good checkpoint is step {last_checkpoint}")


class StepMetrics:
  """Collects each step's device metrics, checks and logs them one step late, and writes interval means.

  `push(step, metrics, batch_info)` after dispatching a step; `drain()` before a checkpoint or at the end.
  Logged every `log_every` steps: mean loss and grad norm over the interval, lr of the last step, examples/s
  (and tokens/s when the step counts tokens) and seconds per step over the interval's wall time (data loading
  included).
  """

  def __init__(self, writer, log_every: int, progress: Progress, last_checkpoint: Callable[[], Any]):
    self.writer, self.log_every, self.progress = writer, max(1, int(log_every)), progress
    self.last_checkpoint = last_checkpoint
    self.pending: list[tuple[int, Any, dict]] = []
    self._sums: dict[str, float] = {}
    self._count = 0
    self._t0 = time.perf_counter()

  def push(self, step: int, metrics, batch_info: dict):
    self.pending.append((step, metrics, batch_info))
    self._read(keep=1)

  def drain(self):
    self._read(keep=0)

  def restart_clock(self):
    """After work that is not training (validation, a blocking save), so it does not count as step time."""
    self._t0 = time.perf_counter()

  def _read(self, keep: int):
    while len(self.pending) > keep:
      step, metrics, info = self.pending.pop(0)
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      bad = {k: m[k] for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])}
      if bad:
        self.pending.clear()
        raise NonFiniteLossError(step, bad, info, self.last_checkpoint())
      for k in ("loss", "grad_norm") + COUNTS:
        if k in m:
          self._sums[k] = self._sums.get(k, 0.0) + m[k]
      self._count += 1
      self.progress.update(1, loss=m["loss"], lr=m["lr"])
      if step % self.log_every == 0:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self.writer.write_scalars(step, {
            "loss": self._sums["loss"] / self._count, "grad_norm": self._sums["grad_norm"] / self._count,
            "lr": m["lr"], **{f"{k}_per_sec": self._sums[k] / elapsed for k in COUNTS if k in self._sums},
            "step_time_sec": elapsed / self._count})
        self._sums, self._count = {}, 0
        self._t0 = time.perf_counter()


"""Loop plumbing shared by training jobs: reading step metrics one step late, the NaN guard, logging, progress.

Reading a step's loss on the host waits for that step. `StepMetrics` reads step k's metrics only after step k+1
has been dispatched (lag 1), so the device never idles on the host, yet a non-finite loss is seen one step later
at most. Before any checkpoint the loop calls `drain()`, which reads everything pending: a checkpoint is written
only once every loss before it was checked finite, so a NaN never reaches the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
from absl import logging

from idmp_jax.train import checkpoint, metrics
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



class TrainingRun:
  """What every training job does around its step, in one place: resume from the latest checkpoint in
  `workdir/checkpoints` (state, data iterator and the job's JSON `meta`, which holds at least "epoch"), the
  metric writer, the progress bar, the lagged NaN-checked step metrics, and a save that drains those first.

  `run_epochs` drives it: the same epoch/step/checkpoint logic for the UNet and the LLaVA jobs, which differ only
  in their step, their batch description and what happens at the end of an epoch.
  """

  def __init__(self, config, workdir: str, state, meta: dict, open_epoch: Callable[[int], Any], total_steps: int,
               is_main: bool):
    self.config, self.workdir, self.open_epoch, self.total_steps = config, workdir, open_epoch, total_steps
    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                        config_json=json.loads(config.to_json()))
    self.meta, self.epoch_iter, self.state = meta, None, state
    self.last_saved = self.ckpt.latest_step()
    if self.last_saved is not None:
      self.meta = self.ckpt.restore_meta(self.last_saved)
      self.epoch_iter = iter(open_epoch(self.meta["epoch"]))
      self.state = self.ckpt.restore(self.last_saved, checkpoint.abstract_like(state), self.epoch_iter)
      logging.info("resumed from %s/checkpoints/%d (epoch %d)", workdir, self.last_saved, self.meta["epoch"])
    self.step = int(jax.device_get(self.state.step))
    self.writer = metrics.create_writer(workdir, is_main)
    if self.last_saved is None:
      self.writer.write_hparams({k: str(v) for k, v in metrics.flat_config(config).items()})
    self.progress = metrics.Progress(total_steps, self.step, enabled=is_main and config.progress_bar)
    self.step_metrics = StepMetrics(self.writer, config.log_every_steps, self.progress, lambda: self.last_saved)

  def save(self, data_iterator):
    self.step_metrics.drain()  # Every loss up to here is finite, or this raises before anything is written.
    self.ckpt.save(self.step, self.state, data_iterator, self.meta)
    self.last_saved = self.step

  def close(self):
    self.writer.flush()
    self.writer.close()
    self.ckpt.close()


def run_epochs(run: TrainingRun, *, steps_per_epoch: int, step_fn: Callable, batch_info: Callable,
               end_of_epoch: Callable, close_iterator: Callable) -> int:
  """Trains until `run.total_steps`, `config.num_epochs` or `run.meta["stopped_early"]`; returns epochs done.

  step_fn(state, batch) -> (state, step metrics); batch_info(batch, epoch, in_epoch) -> dict naming the batch in
  a NaN report; end_of_epoch(run, epoch) after an epoch's last step with the metrics drained (validation, the
  epoch's adapter, early stopping via run.meta["stopped_early"]); close_iterator(it) releases a data iterator.
  Checkpoints: every `config.checkpoint_every_steps` inside an epoch, at each epoch's end (holding the next
  epoch's iterator, so a resume starts it), and at the end. A NonFiniteLossError stops it with the last good
  checkpoint kept.
  """
  config = run.config
  epoch = run.meta["epoch"]
  try:
    while run.step < run.total_steps and epoch < config.num_epochs and not run.meta.get("stopped_early"):
      it = run.epoch_iter if run.epoch_iter is not None else iter(run.open_epoch(epoch))
      run.epoch_iter = it
      in_epoch = run.step - epoch * steps_per_epoch  # Batches of this epoch already done.
      for batch in it:
        in_epoch += 1
        info = batch_info(batch, epoch, in_epoch)
        run.state, step_out = step_fn(run.state, batch)
        run.step += 1
        run.step_metrics.push(run.step, step_out, info)
        if run.step >= run.total_steps:
          break
        if run.step % config.checkpoint_every_steps == 0 and in_epoch < steps_per_epoch:
          run.save(it)
      if in_epoch < steps_per_epoch:
        break  # max_steps reached mid-epoch.
      run.step_metrics.drain()
      end_of_epoch(run, epoch)
      epoch += 1
      run.meta["epoch"] = epoch
      close_iterator(it)
      run.epoch_iter = iter(run.open_epoch(epoch))
      run.save(run.epoch_iter)
      run.step_metrics.restart_clock()

    run.step_metrics.drain()
    if run.last_saved != run.step:
      if run.epoch_iter is None:
        run.epoch_iter = iter(run.open_epoch(epoch))
      run.save(run.epoch_iter)
    run.ckpt.wait()
    close_iterator(run.epoch_iter)
  except NonFiniteLossError as e:
    run.ckpt.wait()  # The last save (checked finite) completes; nothing after it is written.
    logging.error("%s", e)
    run.writer.close()
    run.progress.close()
    raise
  run.progress.close()
  return epoch

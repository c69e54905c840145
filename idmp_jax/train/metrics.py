"""Metric writers (clu) and the progress bar.

clu's `metric_writers` package imports its TensorFlow SummaryWriter unconditionally, and TensorFlow is a 600 MB
dependency that the GPU image lacks and that, imported beside JAX on a GPU, grabs device memory for itself. So
when TensorFlow is not installed, `TensorBoardWriter` (a clu `MetricWriter` writing event files with the
`tensorboard` package's own pure-Python writer, as torch.utils.tensorboard does) is registered under clu's
`summary_writer` module name before clu is imported; every other clu writer and `create_default_writer` then
work unchanged, and the logs open in TensorBoard as usual. With TensorFlow installed, clu's own writer is used.

`create_writer` adds `JsonlWriter` (one JSON line per write to `metrics.jsonl`): trivially machine-readable, which
the tests and quick scripts use.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from typing import Any, Mapping


def _register_tf_free_summary_writer():
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or "clu.metric_writers" in sys.modules or importlib.util.find_spec("tensorflow"):
    return
  stub = types.ModuleType(name)
  stub.SummaryWriter = lambda logdir: TensorBoardWriter(logdir)  # Resolved at call time (defined below).
  sys.modules[name] = stub


_register_tf_free_summary_writer()

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from clu import metric_writers  # noqa: E402
from clu.metric_writers import interface  # noqa: E402


def _scalar(v) -> float:
  return float(np.asarray(v))


class TensorBoardWriter(interface.MetricWriter):
  """Scalars, texts and hparams (as text) to TensorBoard event files, without TensorFlow."""

  def __init__(self, logdir: str):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(logdir)

  def _add(self, step: int, values):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from tensorboard.compat.proto import summary_pb2
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=_scalar(v)) for k, v in scalars.items()])

  def write_texts(self, step: int, texts: Mapping[str, str]):
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    self._add(step, [summary_pb2.Summary.Value(tag=k, metadata=meta, tensor=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[str(v).encode()], tensor_shape=tensor_shape_pb2.TensorShapeProto()))
                     for k, v in texts.items()])

  def write_hparams(self, hparams: Mapping[str, Any]):
    self.write_texts(0, {"hparams": "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))})

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

  def write_images(self, step, images):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter: images are not written", 1)

  def write_videos(self, step, videos):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter: videos are not written", 1)

  def write_audios(self, step, audios, *, sample_rate):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter: audio is not written", 1)

  def write_histograms(self, step, arrays, num_buckets=None):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter: histograms are not written", 1)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(interface.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines (scalars only), flushed per write."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._f.write(json.dumps({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

  def write_texts(self, step, texts):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


def create_writer(workdir: str, is_main: bool) -> interface.MetricWriter:
  """Process 0: absl log + TensorBoard (`workdir/tensorboard`) + `workdir/metrics.jsonl`; others: log only."""
  if not is_main:
    return metric_writers.create_default_writer(None, just_logging=True, asynchronous=False)
  return metric_writers.MultiWriter([metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), asynchronous=False), JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> dict[int, dict]:
  """{step: the LAST line logged for it} (a resumed run re-logs the steps after its checkpoint)."""
  out: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
  return out


class Progress:
  """tqdm bar over the run's steps on process 0 (ETA from tqdm), silent elsewhere."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)

  def update(self, n: int = 1, **postfix):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                              refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def flat_config(config) -> dict:
  """{"a.b": value} of a nested ConfigDict (hparams for the writers)."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(f"{prefix}{k}.", v)
      else:
        out[prefix + k] = v

  walk("", config)
  return out

"""Runs every job: `python -m idmp_jax.main --config=configs/NAME.py [--config.field=value ...] [--workdir=DIR]`."""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where the job writes (checkpoints, logs, outputs). "
                    "Default: workdir/<config.name or config.task>.")
flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idmp_jax", "xla"),
    "JAX's persistent compilation cache: compiled steps (and GPU autotuning) are kept here, so a restarted job or "
    "app skips compiles of a minute or more. '' turns it off. Keep it private: its files are trusted code.")
flags.mark_flags_as_required(["config"])


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` (nothing when empty); call before the first compile.
  JAX writes only programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s) to compile."""
  if not path:
    return
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that --help and flag errors do not wait for JAX.
  import jax
  from idmp_jax import parallel, tasks

  config = FLAGS.config
  enable_compilation_cache(FLAGS.compilation_cache)
  parallel.initialize_distributed(config)
  task = tasks.get(config.task)  # Fails on an unknown task before any device work.
  workdir = FLAGS.workdir or os.path.join("workdir", config.get("name", config.task))
  mesh = parallel.make_mesh(config)
  logging.info("process %d/%d, devices %s, mesh %s, workdir %s", jax.process_index(), jax.process_count(),
               jax.devices(), dict(mesh.shape), workdir)
  task.run(config, workdir, mesh)


if __name__ == "__main__":
  app.run(main)

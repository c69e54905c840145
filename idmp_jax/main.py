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
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that --help and flag errors do not wait for JAX.
  import jax
  from idmp_jax import parallel, tasks

  config = FLAGS.config
  parallel.initialize_distributed(config)
  task = tasks.get(config.task)  # Fails on an unknown task before any device work.
  workdir = FLAGS.workdir or os.path.join("workdir", config.get("name", config.task))
  mesh = parallel.make_mesh(config)
  logging.info("process %d/%d, devices %s, mesh %s, workdir %s", jax.process_index(), jax.process_count(),
               jax.devices(), dict(mesh.shape), workdir)
  task.run(config, workdir, mesh)


if __name__ == "__main__":
  app.run(main)

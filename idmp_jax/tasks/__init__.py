"""Jobs: each is a module with `run(config, workdir, mesh)`, chosen by `config.task`."""
from __future__ import annotations

import importlib

# Imported lazily so a job does not pay for (or need the dependencies of) the others.
TASKS = {
    "unet_forward": "idmp_jax.tasks.unet_forward",
    "inpaint_sample": "idmp_jax.tasks.inpaint_sample",
    "paint": "idmp_jax.tasks.paint",
    "paint_app": "idmp_jax.tasks.paint_app",
    "inpaint_train": "idmp_jax.tasks.inpaint_train",
    "promptgen_generate": "idmp_jax.tasks.promptgen_generate",
    "promptgen_train": "idmp_jax.tasks.promptgen_train",
}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task = {name!r} is not a known task; choose one of {sorted(TASKS)}")
  return importlib.import_module(TASKS[name])

"""One Orbax CheckpointManager for a training run: each step's checkpoint describes itself.

Items of checkpoint `<workdir>/checkpoints/<step>/`:
  state   the TrainState (step, trainable LoRA leaves, optimizer state, base RNG key), restored onto the abstract
          sharded state so arrays land where the step expects them
  data    the Grain iterator of the current epoch (grain.checkpoint handler: one file per process)
  meta    JSON: where the loop is (epoch, validation history, early-stopping flag, ...)
  config  JSON: the run's config, for the record (not read back: the command line's config rules)

Orbax writes into a temporary directory and renames it when complete, so a write interrupted by a kill never
replaces or corrupts the previous checkpoint; `latest_step` sees finished checkpoints only. Saving is
asynchronous (the next steps overlap the write); `wait` blocks until the last save is on disk.
"""
from __future__ import annotations

from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta", "config")


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a tree of jax.Arrays: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, config_json: dict, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=asynchronous, cleanup_tmp_directories=True)
    self.directory = directory
    self.config_json = config_json
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(self.config_json)))

  def restore_meta(self, step: int) -> dict:
    return dict(self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, abstract_state, data_iterator) -> Any:
    """The state at `step` (laid out like `abstract_state`); `data_iterator` is set to its saved position."""
    try:
      restored = self.manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except ValueError as e:
      if "do not match" not in str(e):
        raise
      raise ValueError(
          f"checkpoint {self.directory}/{int(step)}: its train state is shaped differently from this run's "
          f"({str(e).splitlines()[0]}). A config change that reshapes the state (optimizer.flatten, the LoRA rank "
          "or targets) cannot resume a run written before it: use a fresh workdir, or the settings it was "
          "written with.") from e
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

"""idmp_jax.train.checkpoint: a checkpoint whose train state is shaped unlike the run's (e.g. written before
config.optimizer.flatten) fails with the checkpoint named and what to do, not deep inside Orbax."""
import grain
import jax.numpy as jnp
import pytest

from idmp_jax.train import checkpoint


def test_restore_of_a_differently_shaped_state_names_the_checkpoint(tmp_path):
  data = grain.MapDataset.range(8).to_iter_dataset()
  saver = checkpoint.Checkpointer(str(tmp_path), keep=2, config_json={}, asynchronous=False)
  per_leaf = {"opt": {"a": jnp.zeros(3), "b": jnp.ones(2)}}
  saver.save(1, per_leaf, iter(data), {"epoch": 0})
  saver.wait()
  same = saver.restore(1, checkpoint.abstract_like(per_leaf), iter(data))
  assert float(same["opt"]["b"][0]) == 1.0
  with pytest.raises(ValueError, match=r"checkpoint .*/1: .*shaped differently.*optimizer\.flatten"):
    saver.restore(1, checkpoint.abstract_like({"opt": jnp.zeros(5)}), iter(data))
  saver.close()

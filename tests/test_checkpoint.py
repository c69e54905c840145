"""idmp_jax.train.checkpoint: a checkpoint whose train state is shaped unlike the run's (e.g. written before
config.optimizer.flatten) fails with the checkpoint named and what to do, not deep inside Orbax."""
import grain
import jax
import jax.numpy as jnp
import optax
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


def test_tree_state_does_not_resume_as_flat(tmp_path):
  """A train state written with its LoRA leaves as a tree (before they were kept as one vector) is refused the same
  way by a run that keeps them flat, and a flat state resumes with its layout."""
  from idmp_jax.train import state as train_state
  data = grain.MapDataset.range(8).to_iter_dataset()
  saver = checkpoint.Checkpointer(str(tmp_path), keep=2, config_json={}, asynchronous=False)
  tree = {"x": {"lora_a": jnp.ones((2, 3)), "lora_b": jnp.zeros((3, 2))}}
  tx = optax.flatten(optax.adam(1e-3))
  as_tree = train_state.init_state(tree, tx, jax.random.key(0))
  flat = train_state.init_state(tree, tx, jax.random.key(0), flat=True)
  saver.save(1, as_tree, iter(data), {"epoch": 0})
  saver.save(2, flat, iter(data), {"epoch": 0})
  saver.wait()
  with pytest.raises(ValueError, match=r"checkpoint .*/1: .*shaped differently"):
    saver.restore(1, checkpoint.abstract_like(flat), iter(data))
  back = saver.restore(2, checkpoint.abstract_like(flat), iter(data))
  assert back.layout == flat.layout and back.params.shape == (12,)
  assert float(back.trainable()["x"]["lora_a"][1, 2]) == 1.0
  saver.close()

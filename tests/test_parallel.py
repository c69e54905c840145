"""Sharding rules (idmp_jax.parallel): the "fsdp" preset on SD-2-shaped weights, shapes the fsdp axis does not
divide, the minimum size, rule validation, and where the arrays really land on the 8 forced host devices."""
import jax
import numpy as np
import pytest

from idmp_jax import parallel

# SD-2 leaf names and shapes (Flax layout: Linear (in, out), Conv HWIO), a few of each kind.
SD2_LEAVES = {
    "unet/conv_in/kernel": (3, 3, 9, 320),            # 9 input channels: sharded on its 320 outputs
    "unet/conv_out/kernel": (3, 3, 320, 4),            # sharded on its 320 inputs
    "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (1024, 320),
    "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/lora_a": (1024, 16),
    "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/lora_scale": (),
    "unet/down_blocks_0/resnets_0/norm1/scale": (320,),
    "unet/down_blocks_0/resnets_0/conv1/bias": (320,),
    "vae/encoder/conv_in/kernel": (3, 3, 3, 128),
    "vae/quant_conv/kernel": (1, 1, 8, 8),             # 64 elements: under min_size
    "text/embeddings/token_embedding/embedding": (49408, 1024),
    "text/embeddings/position_embedding/embedding": (77, 1024),
    "text/encoder/layers_0/mlp/fc1/kernel": (1024, 4096),
    "odd/kernel": (3, 5, 7),                           # nothing divisible by 8: replicated
}


def tree(leaves):
  out = {}
  for path, shape in leaves.items():
    node = out
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = jax.ShapeDtypeStruct(shape, np.float32)
  return out


def specs(shardings):
  return {parallel.path_name(p): tuple(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((1, 8, 1), parallel.MESH_AXES)


def test_fsdp_preset_on_sd2_shapes(mesh):
  got = specs(parallel.param_shardings(tree(SD2_LEAVES), mesh, "fsdp", min_size=100))
  f = "fsdp"
  assert got == {
      "unet/conv_in/kernel": (None, None, None, f),
      "unet/conv_out/kernel": (None, None, f, None),
      "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (f, None),
      "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/lora_a": (),
      "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/lora_scale": (),
      "unet/down_blocks_0/resnets_0/norm1/scale": (),
      "unet/down_blocks_0/resnets_0/conv1/bias": (),
      "vae/encoder/conv_in/kernel": (None, None, None, f),
      "vae/quant_conv/kernel": (),
      "text/embeddings/token_embedding/embedding": (f, None),
      "text/embeddings/position_embedding/embedding": (),
      "text/encoder/layers_0/mlp/fc1/kernel": (None, f),
      "odd/kernel": (),
  }
  # "replicate" (the default) and an fsdp axis of 1 shard nothing.
  assert set(specs(parallel.param_shardings(tree(SD2_LEAVES), mesh, "replicate")).values()) == {()}
  one = jax.make_mesh((8, 1, 1), parallel.MESH_AXES)
  assert set(specs(parallel.param_shardings(tree(SD2_LEAVES), one, "fsdp")).values()) == {()}


def test_arrays_land_split_over_the_devices(mesh):
  rng = np.random.default_rng(0)
  params = {"to_k": {"kernel": rng.standard_normal((48, 20), np.float32)},
            "conv": {"kernel": rng.standard_normal((3, 3, 4, 6), np.float32)},  # 4 and 6 not divisible by 8
            "norm": {"scale": rng.standard_normal((48,), np.float32)}}
  placed = jax.device_put(params, parallel.param_shardings(params, mesh, "fsdp"))
  k = placed["to_k"]["kernel"]
  assert len(k.sharding.device_set) == 8 and not k.sharding.is_fully_replicated
  assert {s.data.shape for s in k.addressable_shards} == {(6, 20)}
  rows = sorted((s.index[0].start, np.asarray(s.data).tobytes()) for s in k.addressable_shards)
  np.testing.assert_array_equal(np.concatenate([np.frombuffer(b, np.float32).reshape(6, 20) for _, b in rows]),
                                params["to_k"]["kernel"])
  for name in ("conv", "norm"):
    leaf = placed[name]["kernel" if name == "conv" else "scale"]
    assert leaf.sharding.is_fully_replicated
  assert parallel.count_sharded(placed) == (3, 1)


def test_rule_validation():
  assert parallel.sharding_rules("fsdp") == parallel.SHARDING_PRESETS["fsdp"]
  assert parallel.sharding_rules([["a/kernel$", "fsdp"], ("b", "replicate")]) == (("a/kernel$", "fsdp"),
                                                                                  ("b", "replicate"))
  for bad, message in (("fdsp", "config.sharding_rules = 'fdsp': not a preset"),
                       ([("kernel$", "split")], "tactic in"), (["kernel$"], "not a"),
                       ([("kernel[", "fsdp")], "bad regex")):
    with pytest.raises(ValueError, match=message):
      parallel.sharding_rules(bad)


@pytest.mark.parametrize("layouts", ["auto", "default"])
def test_frozen_weights_steps(layouts):
  """FrozenWeights: steps built by `jit` give a plain jit's values, with the frozen tree sharded over the devices
  (the layouts chosen once, by the first step run), the state donated, a second step on the same weights, and a
  new batch shape; a bad `layouts` is refused."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  import ml_collections
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": -1, "tensor": 1}}))
  rng = np.random.default_rng(0)
  kernel = jax.device_put(rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
                          NamedSharding(mesh, P(None, None, None, "fsdp")))
  weights = {"conv": kernel, "bias": jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh, P()))}

  def train(state, w, x):
    y = jax.lax.conv_general_dilated(x, w["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return state + 1, jax.numpy.sum((y + w["bias"]) ** 2)

  def evaluate(scale, w, x):
    return scale * jax.numpy.sum(w["conv"]) + jax.numpy.sum(x)

  frozen = parallel.FrozenWeights(weights, layouts)
  step, eval_step = frozen.jit(train, donate_argnums=(0,)), frozen.jit(evaluate)
  state = jax.numpy.zeros(())
  for shape in [(8, 6, 6, 4), (8, 6, 6, 4), (16, 6, 6, 4)]:
    x = rng.standard_normal(shape).astype(np.float32)
    want = jax.jit(train)(state, weights, x)
    state, loss = step(state, x)
    np.testing.assert_allclose(float(state), float(want[0]))
    np.testing.assert_allclose(float(loss), float(want[1]), rtol=1e-5)
  assert float(state) == 3.0
  np.testing.assert_allclose(float(eval_step(2.0, x)), float(jax.jit(evaluate)(2.0, weights, x)), rtol=1e-5)
  assert frozen.tree["conv"].sharding.is_equivalent_to(kernel.sharding, 4)
  with pytest.raises(ValueError, match="layouts"):
    parallel.FrozenWeights(weights, "tiled")
  with pytest.raises(ValueError, match="in_shardings"):
    frozen.jit(evaluate, in_shardings=None)

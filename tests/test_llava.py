"""LLaVA-NeXT (and its Llama decoder) against transformers on a tiny random model: logits, anyres packing,
greedy generation with left padding, checkpoint layouts and bit-exact export."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from idmp_jax.convert.torch_format import CheckpointError
from idmp_jax.data import llava_processor as lp
from idmp_jax.models import generation, llama
from idmp_jax.models import llava_next as ln
from tests.conftest import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
IMAGE_TOKEN = 99
IMAGE_SIZES = [(40, 70), (90, 30), (64, 64)]  # Two non-square (wide, tall) and one square.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A seeded random LlavaNextForConditionalGeneration saved by transformers (sharded), and its inputs."""
  torch.manual_seed(0)
  vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=2, image_size=32, patch_size=8, projection_dim=8)
  text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, max_position_embeddings=512, pad_token_id=0, rope_theta=500.0)
  cfg = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                     image_grid_pinpoints=PINPOINTS)
  model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
  folder = str(tmp_path_factory.mktemp("tiny_llava"))
  model.save_pretrained(folder, max_shard_size="50KB")
  config, params = ln.load_pretrained(folder)

  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]
  proc = lp.preprocess(images, lp.ImageProcessorConfig(shortest_edge=32, crop_size=(32, 32),
                                                       image_grid_pinpoints=tuple(map(tuple, PINPOINTS))))
  prompts = [[1, 5, IMAGE_TOKEN, 7, 8, 9, 10], [1, IMAGE_TOKEN, 11, 12], [1, 13, 14, IMAGE_TOKEN, 15]]
  seqs = [lp.expand_image_tokens(p, [s], config) for p, s in zip(prompts, proc["image_sizes"])]
  ids, mask = lp.pad_batch(seqs, 0, "left")
  return types.SimpleNamespace(torch_model=model, folder=folder, config=config, params=params, proc=proc, ids=ids,
                               mask=mask)


def _torch_inputs(t):
  return dict(input_ids=torch.tensor(t.ids).long(), attention_mask=torch.tensor(t.mask),
              pixel_values=torch.tensor(t.proc["pixel_values"]), image_sizes=torch.tensor(t.proc["image_sizes"]))


def _our_inputs(t):
  sizes = t.proc["image_sizes"]
  return {"input_ids": jnp.asarray(t.ids), "attention_mask": jnp.asarray(t.mask),
          "pixel_values": jnp.asarray(ln.flatten_pixel_values(t.proc["pixel_values"], sizes, t.config)),
          "feature_index": jnp.asarray(ln.image_feature_index(sizes, t.config))}


def test_config_parsed(tiny):
  c = tiny.config
  assert c.text_config.rope_theta == 500.0 and c.text_config.num_key_value_heads == 2
  assert c.vision_config.image_size == 32 and c.vision_feature_layer == (-2,)
  assert c.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))


def test_logits_match_transformers(tiny):
  with torch.no_grad():
    ref = tiny.torch_model(**_torch_inputs(tiny)).logits.numpy()
  model = ln.LlavaNextForConditionalGeneration(tiny.config)
  inputs = _our_inputs(tiny)
  logits, _ = jax.jit(model.apply)({"params": tiny.params}, inputs.pop("input_ids"), inputs.pop("pixel_values"),
                                   inputs.pop("feature_index"), attention_mask=inputs.pop("attention_mask"))
  real = tiny.mask.astype(bool)  # Padding positions are not compared (their values are arbitrary).
  assert rel_err(np.asarray(logits)[real], ref[real]) <= 1e-4
  assert np.abs(ref).max() > 1e-3


def test_image_feature_index_matches_pack_image_features(rng):
  """Our host-side anyres index against the reference's packing, on features that hold their own index."""
  for side, pinpoints, sizes in [(4, PINPOINTS, IMAGE_SIZES + [(33, 95), (95, 33), (7, 300)]),
                                 (24, [list(p) for p in ln.STOCK_PINPOINTS],
                                  [tuple(s) for s in rng.integers(20, 2000, (12, 2))])]:
    tile = 32 if side == 4 else 336
    config = ln.LlavaNextConfig(image_grid_pinpoints=tuple(map(tuple, pinpoints)),
                                vision_config=ln.clip.CLIPVisionConfig(image_size=tile, patch_size=tile // side))
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        image_grid_pinpoints=pinpoints, vision_config=types.SimpleNamespace(image_size=tile, patch_size=tile // side)))
    views = [ln.num_views(s, config) for s in sizes]
    total = sum(views) * side * side
    feats = torch.arange(total, dtype=torch.float64)[:, None].split([n * side * side for n in views])
    feats = [f.reshape(n, side * side, 1) for f, n in zip(feats, views)]
    packed, _ = transformers.models.llava_next.modeling_llava_next.LlavaNextModel.pack_image_features(
        fake, feats, torch.tensor(sizes), "default", image_newline=torch.tensor([float(total)], dtype=torch.float64))
    expected = torch.cat(packed).reshape(-1).long().numpy()
    np.testing.assert_array_equal(ln.image_feature_index(sizes, config), expected)
    assert sum(ln.num_image_features(s, config) for s in sizes) == len(expected)


def _length_at(row, pattern):
  """The row's length once `pattern` has just been emitted (len(row) if never)."""
  n = len(pattern)
  return next((i + 1 for i in range(n - 1, len(row)) if tuple(row[i - n + 1:i + 1]) == tuple(pattern)), len(row))


def test_greedy_generation_matches_transformers_left_padded(tiny):
  with torch.no_grad():
    free = tiny.torch_model.generate(**_torch_inputs(tiny), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                     eos_token_id=2)[:, tiny.ids.shape[1]:].numpy()
  # An EOS that row 0 emits at step 3 (and not before), so one row stops early and the others run on.
  eos = int(free[0, 3])
  assert eos not in free[0, :3]
  with torch.no_grad():
    ref = tiny.torch_model.generate(**_torch_inputs(tiny), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                    eos_token_id=eos)[:, tiny.ids.shape[1]:].numpy()
  # A stop token sequence that row 1 emits at steps 4-5 (transformers has no such stop: truncate its output).
  seq = (int(ref[1, 4]), int(ref[1, 5]))
  expected = ref.copy()
  for row in expected:
    row[_length_at(row, seq):] = 0
  model = ln.LlavaNextForConditionalGeneration(tiny.config)
  gen = generation.Generator(model, generation.GenerationConfig(
      max_new_tokens=10, eos_token_id=(eos,), pad_token_id=0, stop_token_sequences=(seq,), chunk_size=3,
      prefill_rows=1))  # Row-chunked prefill here; test_sampled_generation prefills all rows at once.
  tokens, lengths = gen(tiny.params, _our_inputs(tiny))
  np.testing.assert_array_equal(tokens, expected)
  assert lengths[0] == 4 and lengths[1] <= 6 and lengths.max() == 10

  # Host-side stop strings (same compiled functions): stop after the text "<t>" of row 2's third token.
  stop_token = int(expected[2, 2])
  decode = lambda toks: "".join(f"<{t}>" for t in toks)
  tokens, lengths = gen(tiny.params, _our_inputs(tiny), stop_strings=(f"<{stop_token}>",), decode_fn=decode)
  for r in range(3):
    n = min(_length_at(expected[r], (stop_token,)), _length_at(expected[r], (eos,)), _length_at(expected[r], seq))
    assert lengths[r] == n
    np.testing.assert_array_equal(tokens[r, :n], expected[r, :n])
    assert (tokens[r, n:] == 0).all()
  assert lengths[2] <= 3


def test_select_tokens():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
  top = np.argsort(-np.asarray(logits), axis=-1)
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draw = lambda cfg: np.asarray(jax.vmap(lambda k: generation.select_tokens(logits, k, cfg))(keys))
  np.testing.assert_array_equal(generation.select_tokens(logits, keys[0], generation.GenerationConfig()),
                                top[:, 0])
  np.testing.assert_array_equal(draw(generation.GenerationConfig(do_sample=True, top_p=1e-6)),
                                np.broadcast_to(top[:, 0], (200, 4)))
  samples = draw(generation.GenerationConfig(do_sample=True, top_k=3))
  assert all(set(samples[:, b]) == set(top[b, :3]) for b in range(4))
  # top_p 0.6: the smallest prefix of the sorted distribution whose mass reaches 0.6.
  probs = np.asarray(jax.nn.softmax(logits, -1))
  samples = draw(generation.GenerationConfig(do_sample=True, top_p=0.6))
  for b in range(4):
    mass = np.cumsum(probs[b, top[b]])
    nucleus = set(top[b, :int(np.searchsorted(mass, 0.6)) + 1])
    assert set(samples[:, b]) <= nucleus
    assert len(set(samples[:, b])) > 1 or len(nucleus) == 1


def test_sampled_generation(tiny):
  """Text-only prompts through the same model: reproducible per key, varying across keys, valid ids."""
  model = ln.LlavaNextForConditionalGeneration(tiny.config)
  ids, mask = lp.pad_batch([[1, 5, 6, 7], [1, 9]], 0, "left")
  inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
  gen = generation.Generator(model, generation.GenerationConfig(max_new_tokens=8, do_sample=True, temperature=5.0,
                                                                top_k=50, top_p=0.99))
  a, _ = gen(tiny.params, inputs, jax.random.PRNGKey(1))
  b, _ = gen(tiny.params, inputs, jax.random.PRNGKey(1))
  c, _ = gen(tiny.params, inputs, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and ((a >= 0) & (a < 100)).all()
  # The same through an int8 KV cache (greedy): the cache really is int8, the tokens valid ids.
  gen8 = generation.Generator(model, generation.GenerationConfig(max_new_tokens=8), cache_dtype=jnp.int8)
  state = gen8.prefill(tiny.params, inputs)
  assert state["cache"]["k"][0].dtype == jnp.int8 and "k_scale" in state["cache"]
  tokens, lengths = gen8(tiny.params, inputs)
  assert tokens.shape == (2, 8) and ((tokens >= 0) & (tokens < 100)).all() and (lengths == 8).all()


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.int8])
def test_llama_cache_matches_full_forward(tiny, cache_dtype):
  """Prefill in two chunks then single steps equal one uncached forward (positions continue per row). An int8
  cache (prefill over the dequantised rows, decode steps reading it as int8) stays within quantisation error,
  and really holds int8 values and per-vector scales."""
  cfg = tiny.config.text_config
  model = llama.LlamaForCausalLM(cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 99, (2, 9)))

  @jax.jit
  def both(params):
    full, _ = model.apply({"params": params}, ids)
    cache = llama.init_cache(cfg, 2, 12, cache_dtype)
    a, cache = model.apply({"params": params}, ids[:, :4], cache=cache)
    b, cache = model.apply({"params": params}, ids[:, 4:7], cache=cache)
    c, cache = model.apply({"params": params}, ids[:, 7:8], cache, method="decode_step")
    d, cache = model.apply({"params": params}, ids[:, 8:9], cache, method="decode_step")
    return full, jnp.concatenate([a, b, c, d], 1), cache

  full, cached, cache = both(tiny.params["language_model"])
  err = rel_err(cached, full)
  if cache_dtype == jnp.float32:
    assert err <= 1e-5
    return
  assert cache["k"][0].dtype == jnp.int8 and cache["v"][1].dtype == jnp.int8
  assert float(jnp.min(cache["k_scale"][0][:, :, :9])) > 0 and float(jnp.max(cache["k_scale"][0][:, :, 9:])) == 0
  assert 0 < err <= 2e-2, err  # Lossy (not the float path), but only by the int8 grid's half step.
  with pytest.raises(ValueError, match="KV cache dtype"):
    llama.init_cache(cfg, 1, 4, jnp.int32)


def test_int8_decode_attention_equals_dequantised():
  """The int8-cache decode attention (grouped heads, a mask) equals the shared attention on the dequantised cache."""
  from idmp_jax.models import attention, quantize
  r = np.random.default_rng(3)
  b, n, nk, s, h = 2, 4, 2, 10, 8
  q = jnp.asarray(r.standard_normal((b, 1, n, h)), jnp.float32)
  (k, ks), (v, vs) = (quantize.quantize_vectors(jnp.asarray(r.standard_normal((b, nk, s, h)) * 3)) for _ in "kv")
  mask = jnp.asarray(r.uniform(size=(b, 1, 1, s)) > 0.3).at[:, :, :, 0].set(True)
  ours = attention.decode_attention_int8(q, k, v, ks, vs, mask=mask)
  deq = lambda a, sc: jnp.repeat(jnp.swapaxes(quantize.dequantize_vectors(a, sc, jnp.float32), 1, 2), n // nk, 2)
  ref = attention.dot_product_attention(q, deq(k, ks), deq(v, vs), mask=mask, implementation="xla")
  assert ours.shape == ref.shape and rel_err(ours, ref) <= 1e-5


def test_right_padded_causal_equals_masked(tiny):
  """Training's right-padded forward (causal attention, no mask tensor) equals the masked forward at every real
  position, and differs at the padding (so the flag really changes the attention)."""
  model = llama.LlamaForCausalLM(tiny.config.text_config)
  ids = jnp.asarray(np.random.default_rng(2).integers(3, 99, (2, 8)))
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
  run = jax.jit(lambda p, rp: model.apply({"params": p}, ids, attention_mask=mask, right_padded=rp)[0],
                static_argnums=1)
  masked, causal = run(tiny.params["language_model"], False), run(tiny.params["language_model"], True)
  real = np.asarray(mask, bool)
  assert rel_err(np.asarray(causal)[real], np.asarray(masked)[real]) <= 1e-6
  assert rel_err(np.asarray(causal)[~real], np.asarray(masked)[~real]) > 1e-3
  with pytest.raises(ValueError, match="right_padded"):
    model.apply({"params": tiny.params["language_model"]}, ids, cache=llama.init_cache(tiny.config.text_config, 2, 9),
                right_padded=True)


# ----------------------------------------------------------------------------------------------------------------
# Files.


def _read_folder(folder):
  out = {}
  for name in os.listdir(folder):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(folder, name)))
  return out


def _write_hub_layout(src, dst, dtype=None, rename=ln.to_hub_key):
  """Re-writes a transformers 5 folder's tensors under another key layout (sharded, with an index)."""
  os.makedirs(dst, exist_ok=True)
  state = {rename(k): (v.astype(dtype) if dtype else v) for k, v in _read_folder(src).items()}
  keys = sorted(state)
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: state[k] for k in part}, os.path.join(dst, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in part})
  import json
  with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return state


@pytest.mark.parametrize("dtype", [None, np.float16])
def test_hub_layout_round_trip_bit_exact(tiny, tmp_path, dtype):
  """A hub-layout folder (vision_tower.vision_model.*, language_model.model.*) -> ours -> exported: same keys,
  dtypes and bytes; and transformers loads the export to the same weights."""
  src = _write_hub_layout(tiny.folder, str(tmp_path / "hub"), dtype)
  assert any(k.startswith("vision_tower.vision_model.") for k in src)
  with open(tmp_path / "hub" / "tokenizer_config.json", "w") as f:
    f.write('{"model_max_length": 4096}\n')
  config, params = ln.load_pretrained(str(tmp_path / "hub"))
  ln.save_pretrained(str(tmp_path / "out"), config, params, dtype=dtype, copy_from=str(tmp_path / "hub"),
                     max_shard_bytes=40_000)
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  out = _read_folder(str(tmp_path / "out"))
  assert sorted(out) == sorted(src)
  for k in src:
    assert out[k].dtype == src[k].dtype and out[k].tobytes() == src[k].tobytes(), k
  assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 4096}\n'
  reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                            dtype=torch.float32)
  ref = {k: v.numpy() for k, v in tiny.torch_model.state_dict().items()}
  got = {k: v.numpy() for k, v in reloaded.state_dict().items()}
  assert sorted(got) == sorted(ref)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k].astype(dtype).astype(np.float32) if dtype else ref[k])


def test_module_path_layout_loads(tiny, tmp_path):
  """Keys as module paths (model.language_model.*, lm_head.*, model.vision_tower.*) load to the same params."""
  def to_module_path(k):
    k = ln.to_hub_key(k)
    if k.startswith("language_model.lm_head."):
      return k[len("language_model."):]
    if k.startswith("language_model.model."):
      return "model.language_model." + k[len("language_model.model."):]
    return "model." + k
  _write_hub_layout(tiny.folder, str(tmp_path / "mp"), rename=to_module_path)
  _, params = ln.load_pretrained(str(tmp_path / "mp"))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, tiny.params)
  assert all(jax.tree.leaves(same))


def test_config_refusals(tiny, tmp_path):
  import json
  with open(os.path.join(tiny.folder, "config.json")) as f:
    raw = json.load(f)
  bad = dict(raw, text_config=dict(raw["text_config"], rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                        "rope_theta": 1e4}))
  with pytest.raises(CheckpointError, match="rope_parameters"):
    ln.LlavaNextConfig.from_dict(bad)
  with pytest.raises(CheckpointError, match="rope_scaling"):
    llama.LlamaConfig.from_dict({"rope_scaling": {"type": "dynamic", "factor": 2.0}})
  with pytest.raises(CheckpointError, match="vision_feature_select_strategy"):
    ln.LlavaNextConfig.from_dict(dict(raw, vision_feature_select_strategy="full"))
  with pytest.raises(CheckpointError, match="mystery_key"):
    ln.LlavaNextConfig.from_dict(dict(raw, mystery_key=1))
  # The stock llava-v1.6-vicuna-7b-hf config.json (partial sub-configs, 4.x keys) parses to the 7B shape.
  stock = {"architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
           "image_grid_pinpoints": [list(p) for p in ln.STOCK_PINPOINTS], "image_token_index": 32000,
           "model_type": "llava_next", "projector_hidden_act": "gelu", "pad_token_id": 32001,
           "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                           "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
                           "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
           "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.39.0.dev0",
           "use_image_newline_parameter": True,
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                             "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
           "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
  c = ln.LlavaNextConfig.from_dict(stock)
  assert (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.vocab_size) == (4096, 32, 32064)
  assert c.vision_config.patch_size == 14 and ln.num_image_features((672, 672), c) == 2928
  ref = transformers.LlavaNextConfig(**{k: v for k, v in stock.items() if k != "architectures"})
  ours = transformers.LlavaNextConfig.from_dict(c.to_dict())
  assert ours.text_config.to_dict()["rms_norm_eps"] == ref.text_config.rms_norm_eps
  assert ours.vision_config.hidden_act == ref.vision_config.hidden_act


def test_remat_policies_same_gradients(tiny):
  """Rematerialisation changes memory, not values: loss and gradients agree across policies."""
  cfg = tiny.config.text_config
  params = tiny.params["language_model"]
  ids = jnp.asarray(np.random.default_rng(2).integers(3, 99, (2, 7)))

  def grads(policy):
    model = llama.LlamaForCausalLM(cfg, remat_policy=policy)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids)[0])[..., 5] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = grads("none"), grads("full")
  assert rel_err(l1, l0) <= 1e-6
  assert rel_err(jnp.concatenate([x.ravel() for x in jax.tree.leaves(g1)]),
                 jnp.concatenate([x.ravel() for x in jax.tree.leaves(g0)])) <= 1e-5

"""Parity of idmp_jax.models.clip with transformers' CLIPTextModel / CLIPVisionModel (tiny random models)."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel, CLIPVisionModel
from transformers import CLIPVisionConfig as HFVisionConfig

from idmp_jax.convert.torch_format import CheckpointError
from idmp_jax.models import clip
from tests.conftest import rel_err

TOL = 1e-4
LAYERS = 3


def _text_model(tmp_path, hidden_act, eos_token_id, dtype=torch.float32):
  torch.manual_seed(0)
  cfg = HFTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS,
                     num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                     eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1, projection_dim=8)
  model = CLIPTextModel(cfg).eval()
  _randomize_norms(model)
  folder = str(tmp_path / "text_encoder")
  model.to(dtype).save_pretrained(folder)
  return model.float(), folder


def _vision_model(tmp_path):
  torch.manual_seed(1)
  cfg = HFVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=8)
  model = CLIPVisionModel(cfg).eval()
  _randomize_norms(model)
  folder = str(tmp_path / "vision")
  model.save_pretrained(folder)
  return model, folder


def _randomize_norms(model):
  """LayerNorms start at (1, 0): perturb them so a swapped or unused norm parameter would show."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))


def _input_ids(rng, eos, batch=3, length=12):
  ids = rng.integers(3, 90, size=(batch, length))
  for b, pos in enumerate([5, 11, 8][:batch]):
    ids[b, pos] = eos
    ids[b, pos + 1:] = eos  # Padded with EOS as OpenAI CLIP's tokenizer does: the first EOS must be picked.
  return ids


@pytest.mark.parametrize("hidden_act,eos", [("gelu", 2), ("quick_gelu", 98)])
def test_text_parity(tmp_path, rng, hidden_act, eos):
  model, folder = _text_model(tmp_path, hidden_act, eos)
  config, params = clip.load_text_encoder(folder)
  assert config.hidden_act == hidden_act and config.eos_token_id == eos
  ids = _input_ids(rng, eos)
  if eos == 2:  # Old rule: argmax of ids. Make the EOS the highest id so the rule matters.
    ids = np.where(ids == 2, 95, ids)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), output_hidden_states=True)
  fn = jax.jit(lambda p, x: clip.CLIPTextTransformer(config).apply({"params": p}, x))
  last, pooled, states = fn(params, ids)
  assert len(states) == len(ref.hidden_states) == LAYERS + 1
  assert rel_err(last, ref.last_hidden_state) <= TOL
  assert rel_err(pooled, ref.pooler_output) <= TOL
  for i in (0, 1, LAYERS):
    assert rel_err(states[i], ref.hidden_states[i]) <= TOL, i


def test_text_fp16_folder_and_round_trip(tmp_path, rng):
  model, folder = _text_model(tmp_path, "gelu", 2, dtype=torch.float16)
  assert next(iter(load_file(os.path.join(folder, "model.safetensors")).values())).dtype == np.float16
  config, params = clip.load_text_encoder(folder)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
  ids = _input_ids(rng, 2)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids))  # Same fp16-rounded weights, in fp32.
  last, pooled, _ = clip.CLIPTextTransformer(config).apply({"params": params}, ids)
  assert rel_err(last, ref.last_hidden_state) <= TOL and rel_err(pooled, ref.pooler_output) <= TOL
  # Saved back in fp16 it is bit-identical to the original file, under the hub's `text_model.` keys.
  out = str(tmp_path / "out")
  clip.save_text_encoder(out, config, params, dtype=np.float16)
  orig = load_file(os.path.join(folder, "model.safetensors"))
  saved = load_file(os.path.join(out, "model.safetensors"))
  assert set(saved) == {"text_model." + k for k in orig}
  assert all(np.array_equal(saved["text_model." + k], v) and saved["text_model." + k].dtype == v.dtype
             for k, v in orig.items())


def test_text_round_trip_transformers(tmp_path):
  model, folder = _text_model(tmp_path, "quick_gelu", 98)
  config, params = clip.load_text_encoder(folder)
  out = str(tmp_path / "out")
  clip.save_text_encoder(out, config, params)
  back, info = CLIPTextModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  _assert_bit_identical(model, back)
  assert back.config.eos_token_id == 98 and back.config.hidden_act == "quick_gelu"
  assert clip.load_text_encoder(out)[0] == config


def test_text_hub_layout(tmp_path):
  """The hub's layout: `text_model.` keys and the obsolete position_ids buffer (transformers < 4.31)."""
  _, folder = _text_model(tmp_path, "gelu", 2)
  path = os.path.join(folder, "model.safetensors")
  sd = load_file(path)
  hub = {"text_model." + k: v for k, v in sd.items()}
  hub["text_model.embeddings.position_ids"] = np.arange(16)[None]
  save_file(hub, path, metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json")) as f:
    raw = json.load(f)
  raw.update(torch_dtype="float32", transformers_version="4.25.0.dev0", dropout=0.0, _name_or_path="x")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(raw, f)
  _, params = clip.load_text_encoder(folder)
  back = clip.text_state_dict(params, key_prefix="")
  assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_vision_parity_and_round_trip(tmp_path, rng):
  model, folder = _vision_model(tmp_path)
  config, params = clip.load_vision_model(folder)
  pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels), output_hidden_states=True)
  fn = jax.jit(lambda p, x: clip.CLIPVisionTransformer(config).apply({"params": p}, x))
  last, pooled, states = fn(params, pixels)
  assert last.shape == (2, 17, 32) and len(states) == LAYERS + 1
  assert rel_err(last, ref.last_hidden_state) <= TOL
  assert rel_err(pooled, ref.pooler_output) <= TOL
  for i in range(LAYERS + 1):  # [0] is after pre_layrnorm, as transformers.
    assert rel_err(states[i], ref.hidden_states[i]) <= TOL, i
  out = str(tmp_path / "out")
  clip.save_vision_model(out, config, params)
  assert all(k.startswith("vision_model.") for k in load_file(os.path.join(out, "model.safetensors")))
  back, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  _assert_bit_identical(model, back)
  # A tower nested in another checkpoint (LLaVA) loads from its prefix.
  nested = {"vision_tower.vision_model." + k: v for k, v in load_file(os.path.join(folder, "model.safetensors"))
            .items()}
  p2 = clip.vision_params_from_state_dict(nested, config, key_prefix="vision_tower.vision_model.")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)))


def _assert_bit_identical(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert set(sa) == set(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("key,value", [("hidden_act", "relu"), ("eos_token_id", [2, 3]), ("rope_theta", 1.0),
                                       ("model_type", "clip_vision_model")])
def test_text_config_refused(key, value):
  raw = dict(clip.CLIPTextConfig().to_dict(), **{key: value})
  with pytest.raises(CheckpointError, match=key):
    clip.CLIPTextConfig.from_dict(raw)


def test_vision_config_refused():
  with pytest.raises(CheckpointError, match="patch_size"):
    clip.CLIPVisionConfig.from_dict({"image_size": 30, "patch_size": 8})
  with pytest.raises(CheckpointError, match="hidden_act"):
    clip.CLIPVisionConfig.from_dict({"hidden_act": "swish"})
  # LLaVA-style nested vision_config (with its `vocab_size` leftover) parses with transformers' defaults.
  c = clip.CLIPVisionConfig.from_dict({"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                                       "model_type": "clip_vision_model", "num_attention_heads": 16,
                                       "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                                       "vocab_size": 32000})
  assert c.hidden_act == "quick_gelu" and c.layer_norm_eps == 1e-5

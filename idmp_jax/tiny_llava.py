"""A tiny random LLaVA-NeXT folder in the stock llava-hf layout, built without torch or downloads (demo and tests).

`make_tiny_llava(folder)` writes what `promptgen_generate` reads from `llava-hf/llava-v1.6-vicuna-7b-hf`:
  config.json, model.safetensors   a LlavaNextForConditionalGeneration of a few thousand parameters, initialised by
                                   `random_params` on our Flax model's param tree and saved with
                                   `llava_next.save_pretrained` (so transformers loads it too)
  tokenizer.json                   a Llama-style tokenizer made with the `tokenizers` library (transformers'
                                   own dependency): BPE trained on the question templates, the colour tags and
                                   the ASCII alphabet, with Llama's normaliser ("▁" for spaces, one prepended) and
                                   decoder; <unk> 0, <s> 1, </s> 2, then the merges, then <image> and <pad> as added
                                   special tokens (as llava-hf appends <image> 32000 and <pad> 32001)
  tokenizer_config.json            add_bos_token true, add_eos_token false (Llama's), padding side left
  preprocessor_config.json         LlavaNextImageProcessor at 32 px tiles with pinpoints in multiples of 32
sentencepiece would give a tokenizer.model too, but it is only a test dependency, and nothing here reads one.
The answers of a random model are noise: this exercises the plumbing (files, shapes, stop strings, parsing).
"""
from __future__ import annotations

import os
import string

import jax
import numpy as np

from idmp_jax.convert.torch_format import write_json
from idmp_jax.data.llava import COLORS, ZERO_SHOT_QUESTION, multimask_question
from idmp_jax.models import clip, llama
from idmp_jax.models import llava_next as ln

PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
TOKENIZER_VOCAB = 384  # BPE vocabulary before the added <image>/<pad> tokens


def _corpus() -> list[str]:
  colors = list(COLORS) + ["gray"]
  lines = [ZERO_SHOT_QUESTION] + [multimask_question(colors[i:i + 3]) for i in range(len(colors))]
  lines += ["".join(f"<{c}>a small {c} boat on the water</{c}>" for c in colors)]
  lines += [string.ascii_letters + string.digits + string.punctuation + " \n"]  # every ASCII symbol encodes
  return lines


def make_tiny_tokenizer(folder: str) -> dict:
  """Writes tokenizer.json + tokenizer_config.json; returns {"vocab_size", "image_token", "pad_token"} ids."""
  from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                          trainers)
  tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  # Trained on words, as sentencepiece never merges across a "▁"; the saved tokenizer has no pre-tokenizer (as
  # Llama's tokenizer.json), which gives the same pieces since no merge spans a word boundary.
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                show_progress=False)
  tok.train_from_iterator(_corpus(), trainer)
  tok.pre_tokenizer = None
  base = tok.get_vocab_size()
  tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                          AddedToken("<pad>", normalized=False, special=True)])
  tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                     special_tokens=[("<s>", 1)])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  write_json({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "padding_side": "left", "model_max_length": 4096, "clean_up_tokenization_spaces": False},
             os.path.join(folder, "tokenizer_config.json"))
  return {"vocab_size": base + 2, "image_token": base, "pad_token": base + 1}


def tiny_config(vocab_size: int, image_token: int, pad_token: int) -> ln.LlavaNextConfig:
  text = llama.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                           pad_token_id=pad_token)
  vision = clip.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8, projection_dim=8)
  return ln.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                            image_grid_pinpoints=PINPOINTS, image_seq_length=16, pad_token_id=pad_token)


def random_params(config: ln.LlavaNextConfig, seed: int = 0) -> dict:
  """N(0, 0.02) weights, unit norm scales, zero biases, drawn in NumPy on the abstract tree: no compilation
  (Linen's `init` under jit takes tens of seconds on a busy CPU, for a model this size)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == "scale":
      return np.ones(x.shape, np.float32)
    if name == "bias":
      return np.zeros(x.shape, np.float32)
    return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, ln.abstract_params(config))


def make_tiny_llava(folder: str, seed: int = 0) -> str:
  """Writes the folder (idempotent: an existing complete folder is reused) and returns its path."""
  if all(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                               "preprocessor_config.json")):
    return folder
  ids = make_tiny_tokenizer(folder)
  config = tiny_config(**ids)
  ln.save_pretrained(folder, config, random_params(config, seed))
  s = config.vision_config.image_size
  write_json({"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": s},
              "crop_size": {"height": s, "width": s}, "image_grid_pinpoints": [list(p) for p in PINPOINTS],
              "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "do_pad": True, "do_convert_rgb": True, "resample": 3,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
             os.path.join(folder, "preprocessor_config.json"))
  return folder

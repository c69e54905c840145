"""A real CLIP BPE tokenizer folder, built offline for tests (SD-2's `tokenizer/` layout).

The vocabulary comes from open_clip's `bpe_simple_vocab_16e6.txt.gz` (the OpenAI CLIP merges, shipped in the
`open-clip-torch` wheel). open_clip is located with importlib and never imported: its package __init__ pulls in
torchvision, which does not import beside our torch. The folder is what `stabilityai/stable-diffusion-2-inpainting`
ships under `tokenizer/`: vocab.json (49,408 entries, ids in OpenAI order), merges.txt (48,894 merges), pad "!"
(id 0, not EOS), BOS <|startoftext|> 49406, EOS <|endoftext|> 49407, model_max_length 77.

Usage: `make_clip_tokenizer_folder(tmp_path / "tokenizer")` -> the folder, loadable by
`transformers.CLIPTokenizer.from_pretrained` and `idmp_jax.data.tokenizer.load_clip_tokenizer`.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os

from idmp_jax.tiny import bytes_to_unicode  # One definition of CLIP's byte alphabet.

NUM_MERGES = 49152 - 256 - 2  # what OpenAI's SimpleTokenizer (and transformers' CLIPTokenizer) read


def bpe_vocab_path() -> str:
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("open_clip is not installed: `pip install --no-deps open-clip-torch==3.3.0` ships "
                            "bpe_simple_vocab_16e6.txt.gz")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"bpe_simple_vocab_16e6.txt.gz not found in {list(spec.submodule_search_locations)}")


def clip_merges() -> list[tuple[str, str]]:
  with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  return [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
  tokens = list(bytes_to_unicode().values())
  tokens = tokens + [t + "</w>" for t in tokens]
  tokens += ["".join(m) for m in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}


def make_clip_tokenizer_folder(path) -> str:
  """Writes an SD-2-style CLIP tokenizer folder at `path` (created if needed) and returns it as a string."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  merges = clip_merges()
  vocab = clip_vocab(merges)
  assert len(vocab) == 49408, len(vocab)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "!"}
  with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
               "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
  return path

"""SD-2's CLIP tokenizer, read from a model folder, with the ids of transformers 4.44's slow `CLIPTokenizer`.

The original tokenised with transformers 4.44's slow (pure Python) CLIPTokenizer in an environment without
`ftfy`, so its text cleanup was transformers' BasicTokenizer(do_lower_case=True, strip_accents=False,
do_split_on_punc=False): drop control characters, whitespace to spaces, a space around every CJK ideograph, NFC,
split on whitespace, lower-case, re-join with single spaces. transformers 5 only ships the `tokenizers`-backed
CLIPTokenizer, whose normaliser does NFC + whitespace + lower-case but neither the control-character drop nor the
CJK spacing. `ClipTokenizer.encode` applies that BasicTokenizer cleanup first, then the fast tokenizer; the BPE
(CLIP's regex, byte-level map, merges, `</w>` word suffix) is the same. tests/test_data_tokenizer.py proves the
ids equal to a re-statement of the slow algorithm on ordinary and awkward text.

SD-2 quirk, kept because the original has it: the pad token "!" is a special (added) token, so every "!" in a
caption (clean_caption keeps them) is split out and becomes id 0, in the slow and the fast tokenizer alike.
"""
from __future__ import annotations

import os
import threading
import unicodedata

import numpy as np

MAX_LENGTH = 77


def _is_control(ch: str) -> bool:
  if ch in "\t\n\r":
    return False
  return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
          or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
          or 0x2F800 <= cp <= 0x2FA1F)


def basic_clean(text: str) -> str:
  """transformers' BasicTokenizer(do_lower_case=True, strip_accents=False, do_split_on_punc=False), re-joined."""
  out = []
  for ch in text:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      continue
    if _is_whitespace(ch):
      out.append(" ")
    elif _is_cjk(cp):
      out.append(f" {ch} ")
    else:
      out.append(ch)
  text = unicodedata.normalize("NFC", "".join(out))
  return " ".join(token.lower() for token in text.split())


_LOCK = threading.RLock()


class ClipTokenizer:
  """CLIP BPE with SD-2's special tokens: BOS 49406, EOS 49407, pad "!" = id 0, `period_id` = ".</w>"."""

  def __init__(self, folder: str):
    self.folder = folder
    hf = self.hf
    self.bos_id = int(hf.bos_token_id)
    self.eos_id = int(hf.eos_token_id)
    self.pad_id = int(hf.pad_token_id)
    self.period_id = int(hf.convert_tokens_to_ids(".</w>"))
    self.max_length = int(min(hf.model_max_length, 10**6))

  @property
  def hf(self):
    """The transformers tokenizer, loaded on first use (so unpickling in a worker process is instant)."""
    if self._hf is None:
      with _LOCK:  # Reader threads may ask at once; a concurrent first import of transformers fails.
        if self._hf is None:
          from transformers import CLIPTokenizer
          self._hf = CLIPTokenizer.from_pretrained(self.folder)
    return self._hf

  _hf = None

  def encode(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text with BOS/EOS, truncated to `max_length` (77) keeping the EOS, unpadded."""
    max_length = max_length or self.max_length
    hf = self.hf
    with _LOCK:  # A fast tokenizer with truncation is not safe to call from several threads ("Already borrowed").
      ids = hf([basic_clean(t) for t in texts], truncation=True, max_length=max_length,
               add_special_tokens=True)["input_ids"]
    return [list(map(int, x)) for x in ids]

  def __call__(self, texts: list[str], max_length: int | None = None) -> np.ndarray:
    """(len(texts), 77) int32, each text padded with pad id 0: `padding="max_length"` of the original."""
    max_length = max_length or self.max_length
    out = np.full((len(texts), max_length), self.pad_id, np.int32)
    for row, ids in zip(out, self.encode(texts, max_length)):
      row[:len(ids)] = ids
    return out

  # Pickle the folder and ids, not the vocabulary: a Grain worker reloads the tokenizer when it first needs it.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_hf"}

  def __setstate__(self, state):
    self.__dict__.update(state)


def load_clip_tokenizer(folder) -> ClipTokenizer:
  """Loads the tokenizer from a model folder (its `tokenizer/` subfolder) or from a tokenizer folder itself."""
  folder = os.fspath(folder)
  sub = os.path.join(folder, "tokenizer")
  if os.path.isdir(sub):
    folder = sub
  for name in ("vocab.json", "merges.txt"):
    if not os.path.exists(os.path.join(folder, name)) and not os.path.exists(os.path.join(folder, "tokenizer.json")):
      raise FileNotFoundError(f"{os.path.join(folder, name)}: missing (not a CLIP tokenizer folder)")
  return ClipTokenizer(folder)

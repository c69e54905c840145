"""The CLIP tokenizer gives the ids of transformers 4.44's slow CLIPTokenizer (the original's, without ftfy)."""
import pickle
import unicodedata

import numpy as np
import regex

from tests.data_fixtures import clip_tokenizer, clip_tokenizer_dir  # noqa: F401
from tests.tiny_clip_tokenizer import bytes_to_unicode, clip_merges, clip_vocab

# A re-statement of the slow tokenizer, written from transformers 4.44's tokenization_clip.py / BasicTokenizer.
_PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                     r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _basic_tokenize(text):
  def control(c):
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")

  def space(c):
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"

  def chinese(cp):
    return any(a <= cp <= b for a, b in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                         (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                         (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])
  text = "".join(" " if space(c) else c for c in text if not (ord(c) in (0, 0xFFFD) or control(c)))
  text = "".join(f" {c} " if chinese(ord(c)) else c for c in text)
  text = unicodedata.normalize("NFC", text)
  return " ".join(t.lower() for t in text.strip().split()).split()


class SlowClip:

  def __init__(self):
    merges = clip_merges()
    self.vocab = clip_vocab(merges)
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()

  def bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if bigram not in self.ranks:
        break
      new, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == bigram[0] and word[i + 1] == bigram[1]:
          new.append(word[i] + word[i + 1])
          i += 2
        else:
          new.append(word[i])
          i += 1
      word = tuple(new)
    return list(word)

  def __call__(self, text, max_length=77):
    ids = []
    # special tokens are split out first, SD-2's pad "!" included (an added token of the slow tokenizer too)
    for piece in regex.split(r"(<\|startoftext\|>|<\|endoftext\|>|!)", text):
      if piece in ("<|startoftext|>", "<|endoftext|>", "!"):
        ids.append(self.vocab[piece])
        continue
      for token in _PAT.findall(" ".join(_basic_tokenize(piece))):
        token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
        ids += [self.vocab[t] for t in self.bpe(token)]
    return [49406] + ids[:max_length - 2] + [49407]


TEXTS = [
    "a red motorcycle with chrome wheels parked indoors",
    "A Red  Motorcycle!! parked, outside.",
    "wow! a cat!",
    "don't stop: it's the dog's toy, we'll see; they've gone",
    "l'été à Paris, café crème — naïve façade",
    "ÀÉÎÕÜ ünïcödé Straße İstanbul",
    "日本の絵画と中国の書道",
    "tab\tand\nnewline\r\nand\u00a0nbsp and\u3000ideographic space",
    "control\x07char and zero\x00width\u200bspace",
    "emoji 🎨 painting 🖼️ frame",
    "numbers 12345 and 3.14, 1st 2nd",
    "co-operate, well-being; (parens) [brackets] {braces} <angle> @home #tag $5 %20 ^_^ ~/x",
    "an <|endoftext|> inside",
    "",
    "   ",
    " ".join(["painting"] * 100),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_ids_equal_slow_reference(clip_tokenizer):
  slow = SlowClip()
  ours = clip_tokenizer.encode(TEXTS)
  for text, ids in zip(TEXTS, ours):
    assert ids == slow(text), text
  assert len(ours[TEXTS.index(" ".join(["painting"] * 100))]) == 77
  # SD-2 quirk kept: "!" is the pad token, an added token, so it tokenises to id 0 wherever it occurs
  ids = clip_tokenizer.encode(["wow! a cat!"])[0]
  assert len(ids) == 7 and ids[2] == ids[5] == 0 and ids[3:5] == [320, 2368]


def test_known_ids_and_specials(clip_tokenizer):
  tok = clip_tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.period_id, tok.max_length) == (49406, 49407, 0, 269, 77)
  assert tok.encode(["a red motorcycle", ""]) == [[49406, 320, 736, 10297, 49407], [49406, 49407]]
  padded = tok(["a red motorcycle"])
  assert padded.dtype == np.int32 and padded.shape == (1, 77)
  assert padded[0, :5].tolist() == [49406, 320, 736, 10297, 49407] and not padded[0, 5:].any()


def test_pickles_as_folder(clip_tokenizer):
  blob = pickle.dumps(clip_tokenizer)
  assert len(blob) < 1000  # the folder, not the vocabulary
  assert pickle.loads(blob).encode(TEXTS[:3]) == clip_tokenizer.encode(TEXTS[:3])


def test_loads_from_model_folder(clip_tokenizer_dir, tmp_path):
  import shutil
  from idmp_jax.data.tokenizer import load_clip_tokenizer
  shutil.copytree(clip_tokenizer_dir, tmp_path / "model" / "tokenizer")
  assert load_clip_tokenizer(tmp_path / "model").encode(["a cat"]) == [[49406, 320, 2368, 49407]]

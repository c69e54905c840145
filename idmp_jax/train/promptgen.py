"""The prompt-generator fine-tuning step (SPEC §8, §9): LLaVA-NeXT with LoRA on the language model, cross-entropy
on the answer tokens only.

Examples (`ExampleEncoder`, run in the loader's workers): the original's collator, row by row. The text is
`question + " " + target` tokenised with BOS and no EOS, truncated to `max_length` tokens with ONE `<image>`
token (the original's processor did not expand it); the question alone, tokenised and truncated the same way,
gives how many leading tokens are NOT trained on (the original masks the prefix by its length, not by matching
tokens). Then the `<image>` token is expanded to the image's features, and every row is right-padded to one
fixed `seq_len` (global batches must agree across processes; one compiled shape). Fields:

  input_ids, attention_mask  (T,) int32         right padding
  pixel_values               (V, 3, S, S)       the image's anyres views, zero views after its own (V = the most
                                                any pinpoint gives)
  row_feature_index          (T,) int32         per `<image>` token, its row in [V * p * p view features, newline]
  answer_start               () int32           position of the first answer token
  answer_length              () int32           answer tokens (0 when truncation removed them)

Loss (`loss_fn`): logits are computed only in a window of `answer_window` positions from answer_start - 1 (the
answer is at most max_length - 1 tokens: the full (B, T, 32k) logits of a 3k-token sequence would be the largest
tensor of the step), and the mean is token-level over the whole global batch (SPEC §9): sum of the answer
tokens' cross-entropy / number of answer tokens, rows with valid = 0 (an epoch's padded last batch) left out.
This equals transformers' `LlavaNextForConditionalGeneration(..., labels)` loss with labels -100 everywhere but
the answer tokens (checked in tests/test_promptgen_train.py).
"""
from __future__ import annotations

import functools
import logging as std_logging
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from idmp_jax.data import llava_processor as lp
from idmp_jax.models import llava_next as ln
from idmp_jax.models import lora
from idmp_jax.train import state as train_state

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "row_feature_index", "answer_start", "answer_length",
              "valid")


def max_views(config: ln.LlavaNextConfig) -> int:
  return max(ln.num_views(p, config) for p in config.image_grid_pinpoints)


def max_image_features(config: ln.LlavaNextConfig) -> int:
  """The most `<image>` tokens one image can become: an image with a pinpoint's aspect (nothing unpadded)."""
  return max(ln.num_image_features(p, config) for p in config.image_grid_pinpoints)


def default_seq_len(config: ln.LlavaNextConfig, max_length: int, multiple: int = 64) -> int:
  """A length no example exceeds: max_length text tokens, one of them the `<image>` token that expands to at
  most `max_image_features`; rounded up to `multiple`."""
  n = max_length - 1 + max_image_features(config)
  return -(-n // multiple) * multiple


class ExampleEncoder:
  """LlavaSource example -> the fixed-shape training fields of the module docstring (picklable for Grain)."""

  def __init__(self, model_dir: str, model_config: ln.LlavaNextConfig, *, max_length: int, seq_len: int,
               pixel_dtype: str = "float32"):
    from idmp_jax.tasks.promptgen_generate import LlavaTokenizer
    self.tokenizer = LlavaTokenizer(model_dir)
    self.proc_config = lp.ImageProcessorConfig.load(model_dir)
    self.model_config, self.max_length, self.seq_len = model_config, int(max_length), int(seq_len)
    self.pixel_dtype = pixel_dtype
    self.views = max_views(model_config)
    self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
    side = model_config.vision_config.image_size // model_config.vision_config.patch_size
    self.view_features = side * side
    if max_length < 2:
      raise ValueError(f"max_length = {max_length}: needs at least 2 tokens")

  def __call__(self, example: dict) -> dict:
    c = self.model_config
    prefix = self.tokenizer.encode(example["question"])[:self.max_length]
    full = self.tokenizer.encode(example["prompt"])[:self.max_length]
    answer_length = max(len(full) - len(prefix), 0)
    proc = lp.preprocess([example["image"]], self.proc_config)
    size = tuple(int(s) for s in proc["image_sizes"][0])
    ids = lp.expand_image_tokens(full, [size], c)
    answer_start = len(ids) - answer_length
    if len(ids) > self.seq_len:  # Only with a seq_len set below default_seq_len: the answer's end is cut.
      std_logging.getLogger(__name__).warning("%s: %d tokens, cut to seq_len %d", example.get("stem"), len(ids),
                                              self.seq_len)
      ids = ids[:self.seq_len]
      answer_length = max(0, min(answer_length, self.seq_len - answer_start))
    input_ids, attention_mask = lp.pad_batch([ids], self.pad_id, "right", length=self.seq_len)
    n = ln.num_views(size, c)
    pixels = proc["pixel_values"][0, :n]
    pixels = np.concatenate([pixels, np.zeros((self.views - n,) + pixels.shape[1:], pixels.dtype)])
    if self.pixel_dtype == "bfloat16":  # By name: workers need not import jax to unpickle a bfloat16 dtype.
      import ml_dtypes
      pixels = pixels.astype(ml_dtypes.bfloat16)
    index = ln.image_feature_index([size], c)
    index = np.where(index == n * self.view_features, self.views * self.view_features, index)
    row_index = np.zeros((self.seq_len,), np.int32)
    is_image = input_ids[0] == c.image_token_index
    row_index[is_image] = index[:int(is_image.sum())]
    out = {"input_ids": input_ids[0], "attention_mask": attention_mask[0], "pixel_values": pixels,
           "row_feature_index": row_index, "answer_start": np.int32(answer_start),
           "answer_length": np.int32(answer_length), "stem": example.get("stem", "")}
    for key in ("valid", "index"):  # Added by the training input (idmp_jax.train.input).
      if key in example:
        out[key] = example[key]
    return out


def reference_labels(batch: dict) -> np.ndarray:
  """transformers' labels for a batch of these fields: the answer tokens' ids, -100 elsewhere (for checks)."""
  ids = np.asarray(batch["input_ids"])
  pos = np.arange(ids.shape[1])[None]
  start = np.asarray(batch["answer_start"])[:, None]
  keep = (pos >= start) & (pos < start + np.asarray(batch["answer_length"])[:, None])
  return np.where(keep, ids, -100)


def _answer_logits(module, input_ids, pixel_values, row_feature_index, attention_mask, positions,
                   right_padded=True):
  """Logits (B, A, V) at `positions` (B, A) only: the vision tower, projector and decoder run on the whole
  sequence, the lm_head on the window. Batches are right-padded (the encoder's layout) and the window reads real
  answer positions only, so plain causal attention is exact there (`LlamaModel`'s right_padded)."""
  x = module.embed_rows(input_ids, pixel_values, row_feature_index)
  h, _ = module.language_model.model(inputs_embeds=x, attention_mask=attention_mask, right_padded=right_padded)
  h = jnp.take_along_axis(h, positions[..., None], axis=1)
  return module.language_model.logits(h)


def loss_fn(trainable, frozen, batch, key, *, model: ln.LlavaNextForConditionalGeneration, answer_window: int,
            train: bool = True, right_padded: bool = True):
  """(token-mean cross-entropy over the batch's answer tokens, {"examples", "tokens"}). Trainable LoRA leaves
  and the frozen rest are merged into one tree; LoRA dropout is on when `train`."""
  ids = batch["input_ids"]
  t = ids.shape[1]
  offsets = jnp.arange(answer_window, dtype=jnp.int32)
  positions = jnp.clip(batch["answer_start"][:, None] - 1 + offsets, 0, t - 1)  # Position p predicts p + 1.
  targets = jnp.take_along_axis(ids, jnp.clip(positions + 1, 0, t - 1), axis=1)
  valid = batch["valid"].astype(jnp.float32)
  weight = (offsets[None] < batch["answer_length"][:, None]).astype(jnp.float32) * valid[:, None]
  rngs = {lora.DROPOUT_RNG: key} if train else {}
  logits = model.apply({"params": lora.merge(trainable, frozen)}, ids, batch["pixel_values"],
                       batch["row_feature_index"], batch["attention_mask"], positions, right_padded,
                       method=_answer_logits, rngs=rngs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  count = jnp.sum(weight)
  loss = jnp.sum(ce * weight) / jnp.maximum(count, 1.0)
  tokens = jnp.sum(batch["attention_mask"].astype(jnp.float32) * valid[:, None])
  return loss, {"examples": jnp.sum(valid), "tokens": tokens, "answer_tokens": count}


def make_train_step(model: ln.LlavaNextForConditionalGeneration, answer_window: int,
                    optimizer: optax.GradientTransformation, schedule: Any, right_padded: bool = True):
  """(state, frozen, batch) -> (state, metrics): the step of `idmp_jax.train.state` on this loss (the job's and
  the benchmark's; right_padded=False only to compare the masked attention path)."""
  return train_state.make_train_step(
      functools.partial(loss_fn, model=model, answer_window=answer_window, right_padded=right_padded),
      optimizer, schedule)


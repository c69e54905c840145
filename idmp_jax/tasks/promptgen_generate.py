"""Test-time prompt generation with LLaVA-NeXT (SPEC §6, §8, §9): the paper's prompt-generation variants and the
prompts of SD-2-Inp-RCA-FineTuned-Gen.

Two kinds of examples (`config.examples`):
  "llava"       the prompt-generation table (SPEC §8/§9): LlavaSource examples at the original resolution with the
                variant's options (gray mode for LLaVA-Prompt / 1Mask, `override_gray` for MultiMask-1Pred, all
                regions for MultiMask-All, which MultiMask-LastPred scores from the same files with
                `eval.prompts --last-only`). Output = the decoded answer stripped and lower-cased; per expected colour
                c the text between the first <c> and </c> when both occur, else "" (zero-shot LLaVA-Prompt: the
                whole answer).
  "inpainting"  the -Gen prompts (SPEC §6): InpaintingSource's test crops (same seed, resize/crop, shuffle and
                threshold as `inpaint_sample`, so the same kept masks in the same order), colours reversed over the
                masks (the last mask red), masks painted solid in area order (largest first, smaller on top) onto
                the 8-bit image (truncated from [0, 1]), the colour list of the question in mask order, stop at
                </red>; each mask's prompt = the first complete <c>...</c> of the answer, case kept, "" when missing.

Writes under workdir, per stem (files written whole: temporary file, then rename):
  predictions/<stem>.json   [{"mask", "color", "prediction", "caption"}] in the generator's order (last = the
                            region asked last): what `python -m eval.prompts --predictions DIR/predictions` reads
  prompts/<stem>.json       ("inpainting" only) the prompts as a JSON list in InpaintingSource's mask order: what
                            `inpaint_sample` with `prompts_dir=DIR/prompts` reads
  generations/<stem>.json   {"question", "answer" (decoded new tokens, special tokens skipped), "colors", "masks"}
A stem is done once its predictions file exists (written last); a rerun skips done stems. Everything checkable
without compute (model folder and its files, adapter, dataset, every example's files) is checked first, with paths.

Decoding (SPEC §9): left padding, greedy, `max_new_tokens` (512), stop on EOS or the stop string (</red> for
multi-mask questions, </gray> in gray mode), which stays in the answer. The answer is the decode of the new tokens
only (the original split the decoded prompt+answer after "ASSISTANT: "; the question ends there and contains no
colour tags, so both give the same regions).

Parallelism: the generation code (`models.generation`) has no sharding annotations (its KV cache is created inside
jit on the default device, and the anyres embedding gathers across rows), so a batch runs on ONE device. Batches
are spread over the mesh's local devices instead: one thread per device, each with its own Generator and a full
copy of the params (replicated: 14 GB for the 7B in bf16); processes split the stems. Shapes are bucketed
(sequence and image-feature counts rounded up to `length_bucket`, views padded to the most any image can have) so
a device compiles once per bucket, not once per batch.

Differences from the original: weights in `dtype` (bf16) instead of 4-bit NF4, or per-channel int8 or grouped
int4 with `config.quantize` (applied after the adapter is merged); the question is not truncated to
512 tokens (it is ~70). The tokenizer is the folder's tokenizer.json read with `tokenizers` (`LlavaTokenizer`).
`config.adapter` (the fine-tuned variants' LoRA): a peft folder (adapter_config.json + adapter_model.safetensors),
written by `promptgen_train` or by peft itself under transformers 4.x or 5.x module names; it is merged into the
kernels once at load (`lora.merge_lora`), so generation runs the plain model.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import queue
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from idmp_jax.convert import torch_format
from idmp_jax.data import files
from idmp_jax.data import llava_processor as lp
from idmp_jax.data.llava import COLORS, LlavaConfig, LlavaSource, draw_mask, multimask_question
from idmp_jax.models import generation, lora, quantize
from idmp_jax.models import llava_next as ln


def default_config() -> ml_collections.ConfigDict:
  """The paper's test settings (SPEC §9); the variant configs (configs/llava_*.py) set the example options."""
  c = ml_collections.ConfigDict()
  c.task = "promptgen_generate"
  c.name = "promptgen_generate"
  c.seed = 42
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dtype = "bfloat16"            # Compute dtype (the original: 4-bit NF4 weights with fp16/bf16 compute).
  c.attention = "auto"
  c.kv_cache = ""                 # "" = the compute dtype; "int8": one scale per cached vector, half the bytes a
                                  # decode step reads from the cache (lossy; models/quantize.py).
  c.quantize = ""                 # "" = the compute dtype; "int8": the decoder's Linear kernels per-channel int8
                                  # (after the adapter is merged), half the weight bytes a decode step reads;
                                  # "int4": 4-bit with a scale per 64 rows (as the original's NF4), a quarter.
                                  # Both lossy (models/quantize.py).
  c.model_dir = ""                # llava-v1.6-vicuna-7b-hf folder (weights + tokenizer.json); "tiny": a tiny random
                                  # one built in workdir (idmp_jax/tiny_llava.py).
  c.adapter = ""                  # peft LoRA adapter folder of the fine-tuned variants ("" = base model).
  c.require_adapter = False       # The fine-tuned variants set it: an empty `adapter` is then an error.
  c.data_dir = ""                 # mm_inp_dataset root; "demo": build the demo dataset in workdir.
  c.split = "test"
  c.max_images = 0                # 0: the whole split.
  c.examples = "llava"            # "llava" (prompt-generation table) | "inpainting" (-Gen prompts); see docstring.
  # LlavaSource options (examples = "llava").
  c.question = "multimask"        # "multimask" | "zero_shot" (LLaVA-Prompt, SPEC §8.10).
  c.only_gray_concept = False     # gray mode (LLaVA-Prompt, 1Mask, MultiMask-1Pred).
  c.override_gray = False         # MultiMask-1Pred: painted red, asked as "gray".
  c.red_check_survivors = False   # the fix of the SPEC §8.4 quirk (off: reproduce it).
  c.max_concepts = 5
  c.masked_area_threshold = 0.65
  # InpaintingSource options (examples = "inpainting"): must match the inpaint_sample run that reads the prompts.
  c.resolution = 512
  c.selection = ""                # Optional selection manifest (stem -> kept mask names), as inpaint_sample's.
  # Decoding.
  c.batch_size = 8                # Rows per device call.
  c.max_new_tokens = 512
  c.stop_string = ""              # "" = </gray> in gray mode, else </red>.
  c.parse = ""                    # "" = auto: "whole" (zero-shot), "first_pair" (inpainting), else "split".
  c.chunk_size = 32               # Decode steps per device call between host stop-string checks.
  c.prefill_rows = 0              # Decoder prefill rows at a time (0 = the whole batch); bounds activation memory.
  c.length_bucket = 256           # Token and image-feature counts are rounded up to a multiple of this.
  c.devices = 0                   # Local devices used (0 = all of the mesh's on this process).
  c.num_workers = 4               # Threads per device reading and painting examples.
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A variant config turned into the CPU demo: the tiny random LLaVA-NeXT and the demo dataset, built in the
  workdir, fp32, a few new tokens (the answers are noise: the weights are random)."""
  c.name = c.name + "_demo"
  c.model_dir, c.data_dir = "tiny", "demo"
  c.adapter, c.require_adapter = "", False
  c.dtype = "float32"
  c.batch_size, c.max_new_tokens, c.chunk_size, c.length_bucket = 2, 16, 8, 64
  c.resolution = 64  # configs/demo.py paints at 64 px: the same kept masks when its -Gen run reads these prompts.
  return c


# ----------------------------------------------------------------------------------------------------------------
# Parsing the answers.


def split_region(text: str, color: str) -> str:
  """SPEC §9: the text between the first <c> and </c> when both tags occur in the text, else "". Written as the
  usual `text.split("<c>")[1].split("</c>")[0]`: the piece after the first <c> ends at the next <c> or </c>,
  whichever comes first; with a </c> only before the first <c>, the whole piece after <c> is returned."""
  open_, close = f"<{color}>", f"</{color}>"
  if open_ not in text or close not in text:
    return ""
  return text.split(open_)[1].split(close)[0]


def first_pair(text: str, color: str) -> str:
  """SPEC §6: the content of the first complete <c>...</c> (shortest match, across newlines), else ""."""
  m = re.search(f"<{re.escape(color)}>(.*?)</{re.escape(color)}>", text, re.DOTALL)
  return m.group(1) if m else ""


def parse_answer(answer: str, colors: Sequence[str], rule: str) -> list[str]:
  """One prediction per expected colour, in the order of `colors`. `rule`: "split" (SPEC §9: stripped,
  lower-cased answer, `split_region`), "whole" (zero-shot: the stripped, lower-cased answer for every colour),
  "first_pair" (SPEC §6: `first_pair` on the answer as decoded, case kept)."""
  if rule == "first_pair":
    return [first_pair(answer, c) for c in colors]
  text = answer.strip().lower()
  if rule == "whole":
    return [text for _ in colors]
  if rule == "split":
    return [split_region(text, c.lower()) for c in colors]
  raise ValueError(f"parse rule must be 'split', 'whole' or 'first_pair', got {rule!r}")


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer.


def _token_text(value):
  return value.get("content") if isinstance(value, dict) else value


class LlavaTokenizer:
  """The folder's tokenizer.json through the `tokenizers` library, as transformers 4.44's LlamaTokenizerFast (the
  original's) used it: the file's pipeline, with the BOS/EOS template rebuilt from tokenizer_config.json's
  add_bos_token / add_eos_token (its `update_post_processor`). Decoding skips special tokens (<image>, <pad>)."""

  def __init__(self, folder: str):
    from tokenizers import Tokenizer, processors
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: tokenizer file not found (a llava-hf model folder ships tokenizer.json)")
    self.tokenizer = Tokenizer.from_file(path)
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # The latter wins, as in transformers.
      p = os.path.join(folder, name)
      if os.path.isfile(p):
        cfg.update(torch_format.read_json(p))
    ids = lambda key, default: self.tokenizer.token_to_id(_token_text(cfg.get(key)) or default)
    self.bos_token = _token_text(cfg.get("bos_token")) or "<s>"
    self.eos_token = _token_text(cfg.get("eos_token")) or "</s>"
    self.bos_id, self.eos_id = ids("bos_token", "<s>"), ids("eos_token", "</s>")
    pad = _token_text(cfg.get("pad_token"))
    self.pad_id = self.tokenizer.token_to_id(pad) if pad else None
    add_bos, add_eos = cfg.get("add_bos_token", True), cfg.get("add_eos_token", False)
    if self.bos_id is None and add_bos or self.eos_id is None and add_eos:
      raise ValueError(f"{path}: BOS/EOS tokens {self.bos_token!r}/{self.eos_token!r} are not in the vocabulary")
    bos, eos = ([self.bos_token] if add_bos else []), ([self.eos_token] if add_eos else [])
    single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    special = [(t, self.tokenizer.token_to_id(t)) for t in bos + eos]
    self.tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                                  special_tokens=special)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# Examples.


class _NoClipTokenizer:
  """InpaintingSource packs a CLIP context that prompt generation does not use; this stands in for the CLIP
  tokenizer (placeholder ids) so the mask selection is the source's own code, not a copy of it."""
  bos_id, eos_id, pad_id, period_id, max_length = 1, 2, 0, 3, 77

  def encode(self, texts):
    return [[1, 2] for _ in texts]


def gen_colors(num_masks: int) -> list[str]:
  """SPEC §6: red, green, blue, yellow, cyan reversed over the masks: the last mask is red."""
  return list(COLORS)[:num_masks][::-1]


def to_uint8(pixel_values: np.ndarray) -> np.ndarray:
  """[-1, 1] -> [0, 1] -> 8 bits by truncation, as the original's `.mul(255).byte()`."""
  return ((pixel_values * np.float32(0.5) + np.float32(0.5)) * np.float32(255)).astype(np.uint8)


def painted_question(image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[str]) -> tuple[np.ndarray, str]:
  """The MultiMask model's input for one image (SPEC §6/§8 at test time): mask i painted solid in colour
  `colors[i]` onto the uint8 (H, W, 3) image, largest first (smaller masks on top), and the question listing the
  colours in mask order with red moved to the end (the test-time order, which the stop string </red> relies on).
  Painting before or after the 8-bit conversion gives the same bytes (0 and 255 are exact)."""
  for i in sorted(range(len(masks)), key=lambda i: float(masks[i].sum()), reverse=True):  # stable: largest first
    image = draw_mask(image, masks[i], COLORS[colors[i]], 1.0)
  asked = sorted(colors, key=lambda c: c == "red")  # stable: red last
  return image, multimask_question(asked)


def inpainting_example(example: dict) -> dict:
  """The -Gen question and painted image from an InpaintingSource example (extras on)."""
  k = len(example["mask_names"])
  colors = gen_colors(k)  # Red already last: the question keeps mask order.
  image, question = painted_question(to_uint8(example["pixel_values"]), example["masks"][:k], colors)
  return {"stem": example["stem"], "image": image, "question": question, "colors": colors,
          "masks": list(example["mask_names"]), "captions": list(example["captions"])}


def llava_example(example: dict) -> dict:
  return {"stem": example["stem"], "image": example["image"], "question": example["question"],
          "colors": list(example["colors"]), "masks": list(example["mask_names"]),
          "captions": list(example["captions"])}


# ----------------------------------------------------------------------------------------------------------------
# Inputs.


def resolve_model_dir(model_dir: str, workdir: str, seed: int = 0, field: str = "config.model_dir"):
  """(folder, LlavaNextConfig) after checking the folder's files; "tiny" builds the tiny random LLaVA-NeXT in
  workdir/tiny_llava. `field` names the config field in errors."""
  if model_dir == "tiny":
    from idmp_jax.tiny_llava import make_tiny_llava
    model_dir = make_tiny_llava(os.path.join(workdir, "tiny_llava"), seed=seed)
  if not model_dir or not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{field} = {model_dir!r}: LLaVA-NeXT model folder not found")
  for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing from the LLaVA-NeXT model folder")
  config_path = os.path.join(model_dir, "config.json")
  model_config = ln.LlavaNextConfig.from_dict(torch_format.read_json(config_path), source=config_path)
  torch_format.find_weights(model_dir, ("model",))  # Raises naming the folder when no weights are there.
  return model_dir, model_config


def check_adapter(adapter: str, field: str = "config.adapter"):
  """A peft adapter folder with its two files, or FileNotFoundError naming what is missing."""
  if not os.path.exists(adapter):
    raise FileNotFoundError(f"{field} = {adapter!r}: LoRA adapter not found")
  for name in (lora.PEFT_CONFIG_NAME, lora.PEFT_WEIGHTS_NAME):
    if not os.path.isfile(os.path.join(adapter, name)):
      raise FileNotFoundError(f"{os.path.join(adapter, name)}: missing from the peft adapter folder ({field})")


def _prepare_inputs(config, workdir):
  """Resolves and checks model and data folders (named in every error) before anything is computed."""
  if config.examples not in ("llava", "inpainting"):
    raise ValueError(f"config.examples = {config.examples!r}: expected 'llava' or 'inpainting'")
  if config.kv_cache not in ("", "int8"):
    raise ValueError(f"config.kv_cache = {config.kv_cache!r}: expected '' (the compute dtype) or 'int8'")
  quantize.check_format(config.quantize, "config.quantize")
  model_dir, model_config = resolve_model_dir(config.model_dir, workdir, config.seed)
  if config.require_adapter and not config.adapter:
    raise ValueError(f"config {config.name!r} is a fine-tuned variant: set config.adapter to its LoRA adapter")
  if config.adapter:
    check_adapter(config.adapter)
  data_dir = config.data_dir
  if data_dir == "demo":
    from data_prep.demo import make_demo_dataset
    root = os.path.join(workdir, "demo_data", "mm_inp_dataset")
    data_dir = root if os.path.isdir(root) else make_demo_dataset(os.path.join(workdir, "demo_data"))
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f"config.data_dir = {data_dir!r}: dataset folder not found")
  if config.selection and not os.path.isfile(config.selection):
    raise FileNotFoundError(f"config.selection = {config.selection!r}: selection manifest not found")
  return model_dir, model_config, data_dir


def _make_source(config, data_dir):
  if config.examples == "inpainting":
    from idmp_jax.data.inpainting import InpaintingConfig, InpaintingSource
    data_config = InpaintingConfig(resolution=config.resolution, max_concepts=config.max_concepts,
                                   masked_area_threshold=config.masked_area_threshold, shuffle_concepts=True,
                                   drop_caption_probability=0.0, rca=False, extras=True)
    source = InpaintingSource(data_dir, config.split, _NoClipTokenizer(), data_config, seed=config.seed,
                              selection=config.selection or None)
    return source, ("caption",), lambda i: inpainting_example(source.example(i))
  data_config = LlavaConfig(split=config.split, max_concepts=config.max_concepts,
                            masked_area_threshold=config.masked_area_threshold, shuffle_concepts=True,
                            only_gray_concept=config.only_gray_concept, override_gray=config.override_gray,
                            red_check_survivors=config.red_check_survivors, question=config.question)
  source = LlavaSource(data_dir, data_config, seed=config.seed)
  return source, files.ANNOTATION_KEYS, lambda i: llava_example(source.example(i))


def _check_examples(source, stems, keys):
  problems = []
  for stem in stems:
    problems += [str(p) for p in files.validate_example(source.layout, source.split, stem, keys,
                                                        check_entities=False)]
    if getattr(source, "selection", None) is not None and stem not in source.selection:
      problems.append(f"{source.selection_path}: no entry for stem {stem!r}")
  if problems:
    shown = "\n  ".join(problems[:30])
    raise ValueError(f"{len(problems)} problem(s) in the inputs:\n  {shown}")


def _write_json(obj, path):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Batches.


def _round_up(n: int, m: int) -> int:
  return max(m, math.ceil(n / m) * m)


def make_batch(examples: Sequence[dict], tokenizer: LlavaTokenizer, proc_config: lp.ImageProcessorConfig,
               model_config: ln.LlavaNextConfig, bucket: int) -> dict:
  """Model inputs for a batch, in bucketed shapes: input_ids / attention_mask (B, T) left-padded to a multiple of
  `bucket`; pixel_values (B * max views, 3, S, S) with zero views after the real ones; feature_index padded to a
  multiple of `bucket` (the extra entries are never read: the k-th <image> token takes the k-th feature)."""
  proc = lp.preprocess([e["image"] for e in examples], proc_config)
  sizes = proc["image_sizes"]
  seqs = [lp.expand_image_tokens(tokenizer.encode(e["question"]), [s], model_config)
          for e, s in zip(examples, sizes)]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  ids, mask = lp.pad_batch(seqs, pad, "left", length=_round_up(max(map(len, seqs)), bucket))
  pixels = ln.flatten_pixel_values(proc["pixel_values"], sizes, model_config)
  max_views = max(ln.num_views(p, model_config) for p in model_config.image_grid_pinpoints)
  n_real, n_all = len(pixels), len(examples) * max_views
  pixels = np.concatenate([pixels, np.zeros((n_all - n_real,) + pixels.shape[1:], pixels.dtype)])
  index = ln.image_feature_index(sizes, model_config)
  p2 = (model_config.vision_config.image_size // model_config.vision_config.patch_size) ** 2
  index = np.where(index == n_real * p2, n_all * p2, index)  # The image_newline row moves past the padding views.
  index = np.concatenate([index, np.zeros(_round_up(len(index), bucket) - len(index), index.dtype)])
  return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "feature_index": index.astype(np.int32)}


def generate_answers(generator: generation.Generator, params, inputs: dict, stop_strings: Sequence[str],
                     tokenizer: LlavaTokenizer) -> list[str]:
  """Greedy answers, one decoded string per row (new tokens up to EOS or the stop string, specials skipped)."""
  tokens, lengths = generator(params, inputs, stop_strings=tuple(stop_strings), decode_fn=tokenizer.decode)
  return [tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]


def generation_config(model_config: ln.LlavaNextConfig, tokenizer: LlavaTokenizer, *, max_new_tokens: int,
                      chunk_size: int, prefill_rows: int = 0) -> generation.GenerationConfig:
  """Greedy decoding up to EOS (the tokenizer's and the model's) or max_new_tokens; stop strings come per call."""
  eos = tuple(sorted({tokenizer.eos_id, *model_config.text_config.eos_token_id} - {None}))
  return generation.GenerationConfig(
      max_new_tokens=max_new_tokens, eos_token_id=eos,
      pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, chunk_size=chunk_size,
      prefill_rows=prefill_rows)


_WRITER_GENERATORS: dict = {}


class MaskPromptWriter:
  """The MultiMask prompt generator for one image and its masks at a time, loaded once and compiled once per
  bucketed shape (the paint command and the app): `writer(image, masks, colors) -> (prompts, answer)`.

  The image is painted and asked about as `painted_question` says; decoding is greedy up to EOS, the stop string
  (</red>) or `max_new_tokens`; each colour's prompt is the first complete <c>...</c> of the answer (SPEC §6's
  rule, case kept), stripped, "" when the answer has none. Runs on the default device."""

  def __init__(self, model_config: ln.LlavaNextConfig, params, tokenizer: LlavaTokenizer,
               proc_config: lp.ImageProcessorConfig, *, dtype=jnp.bfloat16, attention: str = "auto",
               max_new_tokens: int = 128, chunk_size: int = 16, length_bucket: int = 256,
               stop_string: str = "</red>", kv_cache: str = ""):
    """params: the model's, already in `dtype` (or quantised) and on the device (`load` does both). kv_cache:
    "" (the compute dtype) or "int8"."""
    self.model_config, self.params, self.tokenizer, self.proc_config = model_config, params, tokenizer, proc_config
    self.length_bucket, self.stop_string = length_bucket, stop_string
    gen_config = generation_config(model_config, tokenizer, max_new_tokens=max_new_tokens, chunk_size=chunk_size)
    key = (model_config, gen_config, jnp.dtype(dtype), attention, kv_cache)
    if key not in _WRITER_GENERATORS:  # Shared by writers of the same model: compiled once per process.
      model = ln.LlavaNextForConditionalGeneration(model_config, dtype=jnp.dtype(dtype), attention_impl=attention)
      _WRITER_GENERATORS[key] = generation.Generator(model, gen_config, cache_dtype=kv_cache or None)
    self.generator = _WRITER_GENERATORS[key]

  @classmethod
  def load(cls, model_dir: str, *, adapter: str = "", quantize: str = "", dtype=jnp.bfloat16, workdir: str = ".",
           seed: int = 0, field: str = "config.llava_dir", **kwargs) -> "MaskPromptWriter":
    """From a llava-hf folder ("tiny": the tiny random one, built in workdir) and optionally the MultiMask peft
    adapter (`promptgen_train`'s export/adapter), merged into the kernels once and then quantised ("int8",
    "int4") as `run` does."""
    model_dir, model_config = resolve_model_dir(model_dir, workdir, seed, field=field)
    if adapter:
      check_adapter(adapter, field="config.llava_adapter")
    params = load_params(model_dir, adapter, jnp.dtype(dtype), quantize)  # Cast on the host, then moved once.
    return cls(model_config, jax.device_put(params), LlavaTokenizer(model_dir), lp.ImageProcessorConfig.load(model_dir),
               dtype=dtype, **kwargs)

  def __call__(self, image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[str]):
    """image: (H, W, 3) uint8; masks: (H, W) arrays (non-zero = inside); colors: one COLORS key per mask."""
    painted, question = painted_question(np.asarray(image, np.uint8), masks, colors)
    inputs = make_batch([{"image": painted, "question": question}], self.tokenizer, self.proc_config,
                        self.model_config, self.length_bucket)
    answer = generate_answers(self.generator, self.params, {k: jnp.asarray(v) for k, v in inputs.items()},
                              (self.stop_string,), self.tokenizer)[0]
    return [p.strip() for p in parse_answer(answer, colors, "first_pair")], answer


# ----------------------------------------------------------------------------------------------------------------


def load_params(model_dir: str, adapter: str, dtype, quantize_weights: str = ""):
  """The generation params on the host: cast to `dtype` (no fp32 copy on any device), the LoRA adapter folded
  into the kernels (W + scale * A B in fp32, one rounding: no adapter cost per token), then with
  `quantize_weights="int8"` ("int4") the decoder layers' Linear kernels in per-channel int8 (grouped int4;
  `models/quantize.py`; the vision tower, projector, embeddings and head stay in `dtype`)."""
  _, params = ln.load_pretrained(model_dir, dtype=dtype)
  if adapter:
    params = jax.device_get(lora.merge_lora(ln.load_peft_adapter(adapter, params)))
  return quantize.quantize_weights(params, quantize_weights, ln.is_decoder_layer)


def run(config, workdir: str, mesh) -> dict:
  model_dir, model_config, data_dir = _prepare_inputs(config, workdir)
  tokenizer = LlavaTokenizer(model_dir)
  proc_config = lp.ImageProcessorConfig.load(model_dir)
  source, keys, build = _make_source(config, data_dir)
  stems = source.stems[:config.max_images] if config.max_images else list(source.stems)
  if not stems:
    raise ValueError(f"{data_dir}: split {config.split!r} has no annotated images")
  index_of = {s: i for i, s in enumerate(source.stems)}
  dirs = {k: os.path.join(workdir, k) for k in ("predictions", "prompts", "generations")}
  done = lambda s: os.path.exists(os.path.join(dirs["predictions"], f"{s}.json"))
  nproc, pid = jax.process_count(), jax.process_index()
  remaining = [s for s in stems if not done(s)]
  todo = remaining[pid::nproc]  # Processes split the stems; each writes its own files.
  _check_examples(source, todo, keys)
  gray = config.only_gray_concept and config.examples == "llava"
  stop = config.stop_string or ("</gray>" if gray else "</red>")
  rule = config.parse or ("whole" if config.examples == "llava" and config.question == "zero_shot" else
                          "first_pair" if config.examples == "inpainting" else "split")
  parse_answer("", ["red"], rule)  # Rejects an unknown rule before compute.
  if not todo:
    print(f"{config.name}: nothing to generate, {len(stems) - len(remaining)} of {len(stems)} stems done -> "
          f"{dirs['predictions']}")
    return dict(images=len(stems), generated=0, predictions_dir=dirs["predictions"], model_dir=model_dir,
                data_dir=data_dir)

  dtype = jnp.dtype(config.dtype)
  params = load_params(model_dir, config.adapter, dtype, config.quantize)
  devices = list(mesh.local_devices)[:config.devices or None]
  model = ln.LlavaNextForConditionalGeneration(model_config, dtype=dtype, attention_impl=config.attention)
  gen_config = generation_config(
      model_config, tokenizer, max_new_tokens=config.max_new_tokens, chunk_size=config.chunk_size,
      prefill_rows=math.gcd(config.batch_size, config.prefill_rows or config.batch_size))
  # One Generator (compiled functions) and one params copy per device; a queue hands free devices to batches.
  slots = queue.Queue()
  for d in devices:
    slots.put((d, generation.Generator(model, gen_config, cache_dtype=config.kv_cache or None),
               jax.device_put(params, d)))
  del params
  for k, d in dirs.items():
    if k != "prompts" or config.examples == "inpainting":
      os.makedirs(d, exist_ok=True)
  readers = concurrent.futures.ThreadPoolExecutor(config.num_workers * len(devices))

  def one_batch(group):
    examples = list(readers.map(lambda s: build(index_of[s]), group))
    padded = examples + [examples[-1]] * (config.batch_size - len(examples))  # Same shapes: one compilation.
    inputs = make_batch(padded, tokenizer, proc_config, model_config, config.length_bucket)
    device, generator, device_params = slots.get()
    try:
      with jax.default_device(device):  # The Generator makes its cache on the default device (thread-local).
        answers = generate_answers(generator, device_params, {k: jax.device_put(v, device) for k, v in
                                                              inputs.items()}, (stop,), tokenizer)
    finally:
      slots.put((device, generator, device_params))
    for ex, answer in zip(examples, answers):
      stem = ex["stem"]
      preds = parse_answer(answer, ex["colors"], rule)
      _write_json({"question": ex["question"], "answer": answer, "colors": ex["colors"], "masks": ex["masks"]},
                  os.path.join(dirs["generations"], f"{stem}.json"))
      if config.examples == "inpainting":
        _write_json(preds, os.path.join(dirs["prompts"], f"{stem}.json"))
      _write_json([{"mask": m, "color": c, "prediction": p, "caption": cap}
                   for m, c, p, cap in zip(ex["masks"], ex["colors"], preds, ex["captions"])],
                  os.path.join(dirs["predictions"], f"{stem}.json"))  # Last: marks the stem done.
    return len(examples)

  batches = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
  pool = concurrent.futures.ThreadPoolExecutor(len(devices))
  try:
    with tqdm(total=len(todo), desc=f"prompts {config.name}", unit="img", disable=pid != 0) as bar:
      for future in concurrent.futures.as_completed([pool.submit(one_batch, b) for b in batches]):
        bar.update(future.result())
  finally:  # On an error, batches not started are dropped (done stems are on disk: a rerun resumes).
    pool.shutdown(cancel_futures=True)
    readers.shutdown(cancel_futures=True)
  out = dirs["prompts"] if config.examples == "inpainting" else dirs["predictions"]
  if pid == 0:
    print(f"{config.name}: {len(todo)} generated on {len(devices)} device(s) x {nproc} process(es), "
          f"{len(stems) - len(remaining)} already there -> {out}")
  return dict(images=len(stems), generated=len(todo), predictions_dir=dirs["predictions"],
              prompts_dir=dirs["prompts"] if config.examples == "inpainting" else None, model_dir=model_dir,
              data_dir=data_dir, devices=len(devices))

"""transformers' LlavaNextForConditionalGeneration (as configured for llava-v1.6-vicuna-7b-hf) in Flax.

  vision_tower.vision_model   CLIP ViT (idmp_jax.models.clip), features from `vision_feature_layer` (-2) with the
                              CLS token dropped ("default" strategy)
  multi_modal_projector       linear_1 -> GELU -> linear_2
  image_newline               one learned vector, appended after every row of the unpadded anyres grid
  language_model              Llama/Vicuna decoder (idmp_jax.models.llama), `model.*` and `lm_head`

anyres packing (the reference's `pack_image_features`) depends only on each image's (H, W), so it is computed on
the host as an index (`image_feature_index`) into [all tile features flattened, image_newline]; inside jit the
packed features are one gather, and they replace the `<image>` token embeddings in row-major order (the
reference's masked_scatter). The text must already hold one `<image>` token per feature
(`idmp_jax.data.llava_processor.expand_image_tokens`, as transformers' processor does).

Inputs (PyTorch layouts where the reference is compared):
  input_ids (B, T), attention_mask (B, T) (1 = real token),
  pixel_values (N, 3, S, S): the views of every image concatenated (base view then tiles, image after image;
    `flatten_pixel_values` turns the processor's padded (B, max_views, 3, S, S) + image_sizes into this),
  feature_index (F,) int32 from `image_feature_index(image_sizes, config)` (F = number of `<image>` tokens).

Files: `load_pretrained(folder)` reads a stock transformers folder (config.json, model.safetensors or sharded with
index) in any of the key layouts below; `save_pretrained` writes the hub's layout (what llava-hf publishes, and
what transformers 4.x and 5.x load), sharded like transformers, copying tokenizer/processor files untouched.
  hub (llava-hf):           language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                            multi_modal_projector.*, image_newline
  transformers 5.x save:    the same without `vision_model.` under vision_tower (checked on 5.24)
  module paths (4.5x save): model.language_model.*, lm_head.*, model.vision_tower.*, model.multi_modal_projector.*,
                            model.image_newline
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.convert import torch_format
from idmp_jax.models import clip, llama
from idmp_jax.models.layers import Linear, gelu

LIST_NAMES = ("layers",)
STOCK_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# LlavaNextConfig's vision tower when config.json has no vision_config (transformers' sub-config defaults).
DEFAULT_VISION = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                      num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
_AUX_FILES_SKIPPED = ("config.json", "model.safetensors", "model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig:
  text_config: llama.LlamaConfig = llama.LlamaConfig()
  vision_config: clip.CLIPVisionConfig = clip.CLIPVisionConfig(**DEFAULT_VISION)
  image_token_index: int = 32000
  image_grid_pinpoints: tuple[tuple[int, int], ...] = STOCK_PINPOINTS
  vision_feature_layer: tuple[int, ...] = (-2,)  # One or several hidden states, concatenated.
  vision_feature_select_strategy: str = "default"
  multimodal_projector_bias: bool = True
  image_seq_length: int = 576
  pad_token_id: Optional[int] = None

  @classmethod
  def from_dict(cls, cfg: dict, source: str = "config.json") -> "LlavaNextConfig":
    supported = {
        "model_type": lambda v: v == "llava_next", "text_config": lambda v: isinstance(v, dict),
        "vision_config": lambda v: isinstance(v, dict), "image_token_index": None, "image_token_id": None,
        "image_grid_pinpoints": lambda v: all(len(p) == 2 for p in v),
        "vision_feature_layer": lambda v: isinstance(v, (int, list, tuple)),
        # "full" keeps the CLS token, which the anyres grid reshape of the reference cannot take.
        "vision_feature_select_strategy": lambda v: v == "default", "projector_hidden_act": lambda v: v == "gelu",
        "multimodal_projector_bias": None, "tie_word_embeddings": lambda v: not v, "image_seq_length": None,
        "use_image_newline_parameter": lambda v: v, "ignore_index": None, "vocab_size": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    torch_format.check_config_keys(cfg, supported, source=source, ignore=llama.GENERIC_CONFIG_KEYS)
    text = cfg.get("text_config") or {"model_type": "llama"}
    text = llama.LlamaConfig.from_dict(text, source=f"{source}: text_config")
    vision = cfg.get("vision_config")
    vision = clip.CLIPVisionConfig.from_dict(vision if vision is not None else DEFAULT_VISION,
                                             source=f"{source}: vision_config")
    layer = cfg.get("vision_feature_layer", -2)
    return cls(
        text_config=text, vision_config=vision,
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        image_grid_pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints", STOCK_PINPOINTS)),
        vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else (layer,),
        vision_feature_select_strategy="default",
        multimodal_projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        image_seq_length=cfg.get("image_seq_length", 576), pad_token_id=cfg.get("pad_token_id"))

  def to_dict(self) -> dict:
    """transformers 5 config.json."""
    layer = self.vision_feature_layer
    vision = self.vision_config.to_dict()
    vision.pop("architectures", None)
    return {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "text_config": self.text_config.to_dict(), "vision_config": vision,
        "image_token_index": self.image_token_index,
        "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
        "vision_feature_layer": layer[0] if len(layer) == 1 else list(layer),
        "vision_feature_select_strategy": self.vision_feature_select_strategy, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": self.multimodal_projector_bias, "tie_word_embeddings": False,
        "image_seq_length": self.image_seq_length, "pad_token_id": self.pad_token_id,
    }


# ----------------------------------------------------------------------------------------------------------------
# anyres geometry (host side, plain Python: it depends only on image sizes).


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The pinpoint (h, w) keeping the most of the image's pixels, then wasting the least (transformers' rule)."""
  oh, ow = int(size[0]), int(size[1])
  best, best_eff, best_waste = None, 0, float("inf")
  for h, w in pinpoints:
    scale = min(w / ow, h / oh)
    eff = min(int(ow * scale) * int(oh * scale), ow * oh)
    waste = w * h - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (h, w), eff, waste
  return best


def anyres_grid(size: Sequence[int], config: LlavaNextConfig) -> tuple[int, int]:
  """(rows, cols) of tiles for an image of (H, W): the best pinpoint in units of the vision input size."""
  h, w = select_best_resolution(size, config.image_grid_pinpoints)
  s = config.vision_config.image_size
  return math.ceil(h / s), math.ceil(w / s)


def num_views(size: Sequence[int], config: LlavaNextConfig) -> int:
  """Views the model takes for an image: the base view + the tiles."""
  rows, cols = anyres_grid(size, config)
  return rows * cols + 1


def _unpadded_box(size: Sequence[int], grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
  """Rows [top, bottom) and cols [left, right) of the (grid_h, grid_w) feature grid that hold the image, not the
  processor's padding (the reference's `unpad_image`, including its round(., 7))."""
  oh, ow = int(size[0]), int(size[1])
  if ow / oh > grid_w / grid_h:
    new_h = int(round(oh * (grid_w / ow), 7))
    pad = (grid_h - new_h) // 2
    return pad, grid_h - pad, 0, grid_w
  new_w = int(round(ow * (grid_h / oh), 7))
  pad = (grid_w - new_w) // 2
  return 0, grid_h, pad, grid_w - pad


def _side(config: LlavaNextConfig) -> int:
  return config.vision_config.image_size // config.vision_config.patch_size


def num_image_features(size: Sequence[int], config: LlavaNextConfig) -> int:
  """How many `<image>` tokens an image of (H, W) becomes."""
  p = _side(config)
  rows, cols = anyres_grid(size, config)
  top, bottom, left, right = _unpadded_box(size, rows * p, cols * p)
  return p * p + (bottom - top) * (right - left + 1)


def image_feature_index(image_sizes: Sequence[Sequence[int]], config: LlavaNextConfig) -> np.ndarray:
  """For every `<image>` token of the batch in order, its row in [view features (N * p * p), image_newline]
  (views ordered as `flatten_pixel_values` gives them)."""
  p = _side(config)
  views = [num_views(s, config) for s in image_sizes]
  newline = sum(views) * p * p
  out, offset = [], 0
  for size, n in zip(image_sizes, views):
    # The base view's features as they are, then the tiles' features as one (rows*p, cols*p) grid (tile-major
    # within each row of tiles), cropped to the image, with the newline after each row. Anyres always has
    # >= 1 tile, so the reference's single-view branch never runs.
    rows, cols = anyres_grid(size, config)
    y, x = np.meshgrid(np.arange(rows * p), np.arange(cols * p), indexing="ij")
    tile = 1 + (y // p) * cols + (x // p)
    grid = offset + tile * p * p + (y % p) * p + (x % p)
    top, bottom, left, right = _unpadded_box(size, rows * p, cols * p)
    grid = grid[top:bottom, left:right]
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), newline)], axis=1)
    out += [offset + np.arange(p * p), grid.reshape(-1)]
    offset += n * p * p
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def flatten_pixel_values(pixel_values: np.ndarray, image_sizes: Sequence[Sequence[int]],
                         config: LlavaNextConfig) -> np.ndarray:
  """The processor's (B, max_views, 3, S, S) (zero-padded) -> the model's (N, 3, S, S), padding views dropped."""
  views = [num_views(s, config) for s in image_sizes]
  if len(views) != len(pixel_values) or any(n > pixel_values.shape[1] for n in views):
    raise ValueError(f"pixel_values {tuple(pixel_values.shape)} does not hold {views} views for image_sizes "
                     f"{[tuple(s) for s in image_sizes]}")
  return np.concatenate([pv[:n] for pv, n in zip(pixel_values, views)])


# ----------------------------------------------------------------------------------------------------------------
# Modules.


class VisionTower(nn.Module):
  """Holds the CLIP tower under `vision_model`, mirroring transformers' CLIPVisionModel."""
  config: clip.CLIPVisionConfig
  attention_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    return clip.CLIPVisionTransformer(self.config, dtype=self.dtype, attention_impl=self.attention_impl,
                                      name="vision_model")(
        pixel_values)


class MultiModalProjector(nn.Module):
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Linear(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_1")(x)
    x = gelu(x)  # ACT2FN["gelu"]: the erf form.
    return Linear(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_2")(x)


class LlavaNextForConditionalGeneration(nn.Module):
  """See the module docstring for inputs. `__call__` returns (logits, cache) like LlamaForCausalLM."""
  config: LlavaNextConfig
  dtype: Any = jnp.float32
  attention_impl: str = "auto"
  remat_policy: str = "none"  # Of the decoder layers (llama.REMAT_POLICIES); the frozen vision tower has none.

  def setup(self):
    c = self.config
    d = c.text_config.hidden_size
    self.vision_tower = VisionTower(c.vision_config, attention_impl=self.attention_impl, dtype=self.dtype)
    self.multi_modal_projector = MultiModalProjector(d, use_bias=c.multimodal_projector_bias, dtype=self.dtype)
    self.language_model = llama.LlamaForCausalLM(c.text_config, dtype=self.dtype,
                                                 implementation=self.attention_impl,
                                                 remat_policy=self.remat_policy)
    self.image_newline = self.param("image_newline", nn.initializers.normal(d ** -0.5), (d,), jnp.float32)

  def image_features(self, pixel_values, feature_index):
    """(N, 3, S, S) views -> (F, hidden) packed features, F = len(feature_index)."""
    _, _, states = self.vision_tower(pixel_values.astype(self.dtype))
    x = jnp.concatenate([states[i] for i in self.config.vision_feature_layer], axis=-1)
    x = self.multi_modal_projector(x[:, 1:])  # "default" strategy: drop CLS.
    rows = jnp.concatenate([x.reshape(-1, x.shape[-1]), self.image_newline[None].astype(x.dtype)], axis=0)
    return jnp.take(rows, feature_index, axis=0)

  def embed(self, input_ids, pixel_values=None, feature_index=None):
    """Token embeddings with the image features in place of the `<image>` tokens (k-th token, k-th feature)."""
    x = self.language_model.embed(input_ids)
    if pixel_values is None:
      return x
    feats = self.image_features(pixel_values, feature_index).astype(x.dtype)
    is_image = input_ids == self.config.image_token_index
    k = jnp.cumsum(is_image.reshape(-1), dtype=jnp.int32).reshape(is_image.shape) - 1
    k = jnp.clip(k, 0, feats.shape[0] - 1)
    return jnp.where(is_image[..., None], jnp.take(feats, k, axis=0), x)

  def embed_rows(self, input_ids, pixel_values, row_feature_index):
    """`embed` with each row's image kept to its row (training: a batch sharded by rows gathers nothing across
    devices). pixel_values (B, V, 3, S, S): row b's views, zero views after its own; row_feature_index (B, T):
    for each `<image>` token its row in [the row's V * p * p view features, image_newline] (other entries are
    not read). `row_feature_index` is what `image_feature_index([size], config)` gives for one image, with its
    newline entry moved to V * p * p."""
    x = self.language_model.embed(input_ids)
    b, v = pixel_values.shape[:2]
    _, _, states = self.vision_tower(pixel_values.reshape((b * v,) + pixel_values.shape[2:]).astype(self.dtype))
    f = jnp.concatenate([states[i] for i in self.config.vision_feature_layer], axis=-1)
    f = self.multi_modal_projector(f[:, 1:])  # (B * V, p * p, D), "default" strategy: drop CLS.
    f = f.reshape(b, -1, f.shape[-1])
    newline = jnp.broadcast_to(self.image_newline.astype(f.dtype), (b, 1, f.shape[-1]))
    rows = jnp.concatenate([f, newline], axis=1)
    feats = jnp.take_along_axis(rows, jnp.clip(row_feature_index, 0, rows.shape[1] - 1)[..., None], axis=1)
    is_image = input_ids == self.config.image_token_index
    return jnp.where(is_image[..., None], feats.astype(x.dtype), x)

  def __call__(self, input_ids, pixel_values=None, feature_index=None, *, attention_mask=None, positions=None,
               cache=None, last_only: bool = False, right_padded: bool = False):
    x = self.embed(input_ids, pixel_values, feature_index)
    return self.language_model(inputs_embeds=x, attention_mask=attention_mask, positions=positions,
                               cache=cache, last_only=last_only, right_padded=right_padded)

  # The generation interface (idmp_jax.models.generation), shared with LlamaForCausalLM.
  def prefill(self, inputs_embeds, attention_mask, cache):
    """A cached forward of the language model on embeddings (B, T, D) (from `embed`) -> (last logits, cache)."""
    return self.language_model.prefill(inputs_embeds, attention_mask, cache)

  def decode_step(self, input_ids, cache):
    """One cached step of the language model on text tokens (B, T) -> (last logits (B, 1, V), cache)."""
    return self.language_model.decode_step(input_ids, cache)


def is_decoder_layer(path: tuple) -> bool:
  """A module path inside the language model's decoder layers: what weight quantisation applies to (the vision
  tower, projector, embeddings and head stay in the compute dtype)."""
  return path[0] == "language_model" and "layers" in "/".join(path)


def abstract_params(config: LlavaNextConfig) -> dict:
  """The param tree's shapes (fp32), without allocating it."""
  model = LlavaNextForConditionalGeneration(config)
  s = config.vision_config.image_size
  ids = jnp.zeros((1, 1), jnp.int32)
  pix = jnp.zeros((1, 3, s, s), jnp.float32)
  index = jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, pix, index)["params"])


# ----------------------------------------------------------------------------------------------------------------
# Files.

_KEY_RULES = (  # Any accepted layout -> the hub's; applied in order.
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|image_newline)"), r"\1"),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)
_OBSOLETE = ("vision_tower.vision_model.embeddings.position_ids",)  # A buffer in transformers < 4.31 files.


def to_hub_key(key: str) -> str:
  for pattern, repl in _KEY_RULES:
    key = pattern.sub(repl, key)
  return key


def load_pretrained(folder: str, dtype=np.float32) -> tuple[LlavaNextConfig, dict]:
  """A transformers LlavaNextForConditionalGeneration folder -> (config, params in `dtype`)."""
  config_path = os.path.join(folder, "config.json")
  config = LlavaNextConfig.from_dict(torch_format.read_json(config_path), source=config_path)
  files = torch_format.find_weights(folder, ("model",))
  state = {}
  for key, value in torch_format.load_state_dict(files).items():
    hub = to_hub_key(key)
    if hub in state:
      raise torch_format.CheckpointError(f"{folder}: tensors {key!r} and another key both map to {hub!r}")
    if hub not in _OBSOLETE:
      state[hub] = value
  params = torch_format.state_dict_to_params(state, abstract_params(config), LIST_NAMES, dtype=dtype,
                                             source=", ".join(files))
  return config, params


def state_dict(params, dtype=None) -> dict[str, np.ndarray]:
  """Params -> hub-layout state dict (NumPy, torch layouts)."""
  return torch_format.params_to_state_dict(jax.device_get(params), LIST_NAMES, dtype=dtype)


def save_pretrained(folder: str, config: LlavaNextConfig, params, *, dtype=None, copy_from: Optional[str] = None,
                    max_shard_bytes: int = 5 * 1024 ** 3) -> None:
  """Writes a folder transformers loads (hub key layout). `dtype` e.g. np.float16 (the hub's; default: as the
  params). Shards above `max_shard_bytes` as `model-0000i-of-0000n.safetensors` + index, like transformers.
  `copy_from`: a model folder whose other files (tokenizer, processor, generation config) are copied untouched."""
  os.makedirs(folder, exist_ok=True)
  state = state_dict(params, dtype)
  keys = sorted(state)
  shards, current, size = [], [], 0
  for k in keys:
    n = state[k].nbytes
    if current and size + n > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(k)
    size += n
  shards.append(current)
  if len(shards) == 1:
    torch_format.save_state_dict(state, os.path.join(folder, "model.safetensors"))
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      torch_format.save_state_dict({k: state[k] for k in shard}, os.path.join(folder, name))
      weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))}, "weight_map": weight_map}
    torch_format.write_json(index, os.path.join(folder, "model.safetensors.index.json"))
  dtype_name = next(iter(state.values())).dtype.name
  torch_format.write_json(dict(config.to_dict(), dtype=dtype_name), os.path.join(folder, "config.json"))
  if copy_from:
    for name in sorted(os.listdir(copy_from)):
      src = os.path.join(copy_from, name)
      weights = name.endswith(".safetensors") or name.endswith(".safetensors.index.json") or name.endswith(".bin")
      if os.path.isfile(src) and not weights and name not in _AUX_FILES_SKIPPED:
        shutil.copyfile(src, os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapters of the language model, in peft's folder format.

# Every Linear of the language model except lm_head: what the original's fine-tuning targets (its
# `find_all_linear_names`: nn.Linear modules under `language_model`, lm_head skipped).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(targets: Sequence[str] = LORA_TARGETS) -> str:
  """peft's `target_modules` as a regex (full match on module names) selecting the language model's `targets`
  under transformers 4.x names (language_model.model.layers...) and 5.x names (model.language_model.layers...),
  and nothing in the vision tower (whose attention has q/k/v_proj too)."""
  return r".*language_model\..*\.(" + "|".join(re.escape(t) for t in targets) + ")"


def save_peft_adapter(folder: str, params, targets: Sequence[str] = LORA_TARGETS,
                      base_model_name_or_path: str = "") -> str:
  """The tree's LoRA leaves as a peft folder for LlavaNextForConditionalGeneration: keys under the hub / 4.x
  module names (`base_model.model.language_model.model.layers.N...`, what the original's transformers 4.44
  wrote), which peft on transformers 5 maps to its new module paths itself."""
  from idmp_jax.models import lora
  return lora.save_peft_adapter(folder, params, LIST_NAMES, target_modules=lora_target_regex(targets),
                                base_model_name_or_path=base_model_name_or_path)


def load_peft_adapter(folder: str, params, dropout: float | None = None) -> dict:
  """A peft folder (written by peft under transformers 4.x or 5.x names, or by `save_peft_adapter`) attached to
  a LLaVA-NeXT param tree; `lora.merge_lora` folds it into the kernels for inference."""
  from idmp_jax.models import lora
  return lora.load_peft_adapter(folder, params, LIST_NAMES, rename=to_hub_key, dropout=dropout)

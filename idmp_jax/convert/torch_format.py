"""PyTorch (diffusers/transformers) checkpoint format <-> Flax param trees, without torch.

One naming rule serves every ported model. A Flax module path mirrors the PyTorch module path, with list
indices folded into the name (`down_blocks_0`, `to_out_0`) because Linen names cannot be bare integers. Which
names are such lists is declared per model (`list_names`), since PyTorch names like `linear_1` also end in a
digit. Leaves map by name:

  kernel (2-D)   <-> weight, transposed      (Linear: torch (out, in), Flax (in, out))
  kernel (4-D)   <-> weight, (2, 3, 1, 0)    (Conv: torch OIHW, Flax HWIO)
  scale          <-> weight                  (norms)
  embedding      <-> weight                  (nn.Embed)
  anything else  <-> the same name           (bias, custom parameters)

Loading starts from the model's abstract param tree, so every parameter the model has must be in the file and
every tensor in the file must be used: both directions are checked and reported by key.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
  """A model folder or file that does not match what the model expects."""


# ----------------------------------------------------------------------------------------------------------------
# Key mapping.


def torch_key(path: tuple[str, ...], list_names: Iterable[str]) -> str:
  """Flax param path -> PyTorch state-dict key."""
  list_names = frozenset(list_names)
  *modules, leaf = path
  parts = []
  for name in modules:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m and m.group(1) in list_names:
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(name)
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Any, list_names: Iterable[str],
                         *, dtype=np.float32, source: str = "checkpoint",
                         key_prefix: str = "") -> dict:
  """Fills `abstract_params` (a tree of ShapeDtypeStructs, e.g. from `jax.eval_shape(model.init, ...)`) from a
  PyTorch state dict. Every parameter must be found with the right shape and every tensor must be used."""
  flat = traverse_util.flatten_dict(_unfreeze(abstract_params))
  out, used, problems = {}, set(), []
  for path, abstract in flat.items():
    key = key_prefix + torch_key(path, list_names)
    if key not in state_dict:
      problems.append(f"missing tensor {key!r} (for Flax param {'/'.join(path)})")
      continue
    used.add(key)
    value = _to_flax_layout(path[-1], np.asarray(state_dict[key]))
    if tuple(value.shape) != tuple(abstract.shape):
      problems.append(f"tensor {key!r} has shape {tuple(np.shape(state_dict[key]))}, the model expects "
                      f"{tuple(abstract.shape)} (Flax layout)")
      continue
    out[path] = np.ascontiguousarray(value.astype(dtype if dtype is not None else value.dtype))
  unexpected = sorted(k for k in state_dict if k.startswith(key_prefix) and k not in used)
  problems += [f"unexpected tensor {k!r} (no parameter of the model maps to it)" for k in unexpected]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointError(f"{source}: {len(problems)} problem(s) mapping weights to the model:\n  {shown}{more}")
  return traverse_util.unflatten_dict(out)


def params_to_state_dict(params: Any, list_names: Iterable[str], *, dtype=None, key_prefix: str = "") -> dict:
  """Flax params -> PyTorch state dict of NumPy arrays (contiguous, torch layout)."""
  flat = traverse_util.flatten_dict(_unfreeze(params))
  out = {}
  for path, value in flat.items():
    array = np.asarray(value)
    if dtype is not None:
      array = array.astype(dtype)
    out[key_prefix + torch_key(path, list_names)] = np.ascontiguousarray(_to_torch_layout(path[-1], array))
  return out


def _unfreeze(tree):
  from flax.core import unfreeze
  return unfreeze(tree) if hasattr(tree, "unfreeze") else tree


# ----------------------------------------------------------------------------------------------------------------
# Files.


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def find_weights(folder: str, stems: Iterable[str]) -> list[str]:
  """The safetensors file(s) of a model folder: `<stem>.safetensors` or a sharded `<stem>.safetensors.index.json`,
  trying each stem (e.g. `diffusion_pytorch_model.fp16` after `diffusion_pytorch_model`)."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: model folder not found")
  for stem in stems:
    single = os.path.join(folder, stem + ".safetensors")
    if os.path.exists(single):
      return [single]
    index = os.path.join(folder, stem + SAFETENSORS_INDEX_SUFFIX)
    if os.path.exists(index):
      shards = sorted(set(read_json(index)["weight_map"].values()))
      return [os.path.join(folder, s) for s in shards]
  names = ", ".join(f"{s}.safetensors" for s in stems)
  bins = [f for f in os.listdir(folder) if f.endswith(".bin")]
  hint = f" (found {bins[0]}: PyTorch pickles are not read; re-save with safe_serialization=True)" if bins else ""
  raise CheckpointError(f"{folder}: no weights file ({names}){hint}")


def load_state_dict(files: Iterable[str]) -> dict[str, np.ndarray]:
  state = {}
  for path in files:
    try:
      state.update(load_file(path))
    except Exception as e:  # safetensors raises its own error types for truncated/invalid files.
      raise CheckpointError(f"{path}: cannot read safetensors ({e})") from e
  return state


def save_state_dict(state: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes atomically (temporary file then rename), so an interrupted export never leaves a half file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  save_file(dict(state), tmp, metadata=metadata or {"format": "pt"})
  os.replace(tmp, path)


def write_json(obj: Any, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def check_config_keys(config: Mapping[str, Any], supported: Mapping[str, Callable[[Any], bool] | None], *,
                      source: str, ignore: Iterable[str] = ()) -> None:
  """Refuses a config.json with a key we do not know, or a known key with a value we do not implement.

  `supported` maps a key to a predicate on its value (None: any value is fine). Keys starting with `_` are
  metadata (`_class_name`, `_diffusers_version`) and ignored, as are `ignore`.
  """
  ignore = set(ignore)
  for key, value in config.items():
    if key.startswith("_") or key in ignore:
      continue
    if key not in supported:
      raise CheckpointError(f"{source}: config key {key!r} is not supported by this port (value {value!r})")
    check = supported[key]
    if check is not None and not check(value):
      raise CheckpointError(f"{source}: config key {key!r} = {value!r} is not supported by this port")

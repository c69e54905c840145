"""LoRA fine-tuning of the prompt generator, LLaVA-NeXT (SPEC §8, §9): the adapters of LLaVA-1Mask and
LLaVA-MultiMask.

  python -m idmp_jax.main --config=configs/llava_multimask_train.py --workdir=runs/llava_multimask \\
      --config.model_dir=/path/llava-v1.6-vicuna-7b-hf --config.data_dir=/path/mm_inp_dataset

`:demo` trains the tiny random LLaVA-NeXT (idmp_jax/tiny_llava.py) on the demo dataset on CPU. The same command
resumes from the latest checkpoint in --workdir.

Recipe (the original's QLoRA, SPEC §9): LoRA r 16, alpha 16, dropout 0.05, gaussian init on every Linear of the
language model but lm_head (q/k/v/o/gate/up/down); vision tower, projector, embeddings, norms and lm_head
frozen; loss on the answer tokens only (idmp_jax.train.promptgen); AdamW (0.9, 0.999, eps 1e-8, wd 0.01), lr 2e-4
constant after a linear warm-up of 1% of the whole run (one epoch: 28.84 of 2,884 steps), gradients
clipped to global norm 0.5; bf16 compute, fp32 LoRA weights and optimizer state.

Differences from the original, by design: the frozen base is bf16, or on the decoder's Linears per-channel int8
(`quantize = "int8"`) or symmetric int4 with a scale per 64 rows (`quantize = "int4"`: the original's 4 bits and
NF4 block size, on a uniform grid; idmp_jax/models/quantize.py), instead of bitsandbytes NF4; the token-mean is
over the global batch (the original averaged per-GPU means); randomness is per example from (seed, stem, epoch).

Parallelism: the mesh's `fsdp` axis shards the frozen base, the LoRA weights and the optimizer state by
`config.sharding_rules` (idmp_jax/parallel.py); batches shard over data x fsdp. `remat_policy` bounds the decoder's
activation memory (the original used gradient checkpointing: "full").

Writes under workdir: checkpoints/<step>/ (Orbax: the LoRA weights, optimizer state, step, data iterator; the base
is reloaded from model_dir on resume), tensorboard/, metrics.jsonl, adapter/epoch_<e>/ and export/adapter/ (peft
folders: adapter_config.json + adapter_model.safetensors, what `PeftModel.from_pretrained` and
`promptgen_generate`'s `config.adapter` read).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from idmp_jax import parallel
from idmp_jax.data.llava import LlavaConfig, LlavaSource
from idmp_jax.models import llava_next as ln
from idmp_jax.models import lora, quantize
from idmp_jax.train import input as train_input, loop, optimizer as optim
from idmp_jax.train import promptgen, state as train_state


def default_config() -> ml_collections.ConfigDict:
  """The paper's recipe (SPEC §9); configs/llava_*_train.py set the variant."""
  c = ml_collections.ConfigDict()
  c.task = "promptgen_train"
  c.name = "promptgen_train"
  c.seed = 42                    # The original's (it adds the process index; ours is host-count invariant).
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 1, "process_id": 0})
  # (regex over '/'-joined paths, "fsdp" | "replicate"): matched against the frozen tree and the train state
  # (params/..., opt_state/.../mu/...), so LoRA weights and their Adam moments shard like the base.
  c.sharding_rules = ((r"(^|/)(language_model|vision_tower|multi_modal_projector)/", "fsdp"),)

  c.model_dir = ""               # llava-v1.6-vicuna-7b-hf folder; "tiny": idmp_jax/tiny_llava.py's, built in workdir.
  c.data_dir = ""                # mm_inp_dataset root; "demo": the demo dataset, built in workdir.

  # Examples (SPEC §8; the original's LlavaDataset options).
  c.only_gray_concept = False    # 1Mask: True.
  c.max_concepts = 5
  c.masked_area_threshold = 0.65
  c.shuffle_concepts = True
  c.remove_intersections = False
  c.max_length = 512             # Text tokens (one <image> token) kept, as the original's processor truncates.
  c.seq_len = 0                  # Padded sequence length after image expansion (0: the most an example can need).
  c.answer_window = 0            # Positions whose logits are computed from the answer's start (0: max_length - 1).
  c.data_workers = 8             # Grain worker processes building examples (0: in the main process).

  # Schedule.
  c.batch_size = 32              # Global batch (the original: 8 per GPU x 4 GPUs).
  c.num_epochs = 1
  c.max_steps = 0                # > 0: stop after this many steps.

  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=16.0, dropout=0.05, init="gaussian",
                                          targets=ln.LORA_TARGETS))
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-4, warmup_fraction_of_run=0.01, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2,
      grad_clip=0.5))

  # Numerics and memory.
  c.dtype = "bfloat16"           # Compute dtype.
  c.frozen_dtype = "bfloat16"    # Storage of the frozen base ...
  c.quantize = ""                # ... or "int8" / "int4": the decoder's Linear kernels (models/quantize.py).
  c.remat_policy = "full"        # Decoder layers: "none" | "full" | "dots" (idmp_jax.models.llama.REMAT_POLICIES).
  c.attention = "auto"

  # Checkpoints and logs.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.log_every_steps = 10
  c.progress_bar = True
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A variant turned into the CPU demo: tiny random LLaVA-NeXT, demo dataset, fp32, a few steps."""
  c.name = c.name + "_demo"
  c.model_dir, c.data_dir = "tiny", "demo"
  c.demo_copies = 2              # Mirrored copies of the 4 demo train images.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.batch_size = 2
  c.num_epochs = 2
  c.max_length = 256             # The demo's longest text is 207 tokens: nothing is cut.
  c.data_workers = 0
  c.dtype = c.frozen_dtype = "float32"
  c.remat_policy = "none"
  c.checkpoint_every_steps = 1
  c.log_every_steps = 1
  return c


def _inputs(config, workdir: str) -> tuple[str, str]:
  """model_dir and data_dir; "tiny" and "demo" are built under the workdir by process 0."""
  model_dir, data_dir = config.model_dir, config.data_dir
  if model_dir == "tiny":
    model_dir = os.path.join(workdir, "tiny_llava")
  if data_dir == "demo":
    data_dir = os.path.join(workdir, "demo_data", "mm_inp_dataset")
  if jax.process_index() == 0:
    if config.model_dir == "tiny":
      from idmp_jax.tiny_llava import make_tiny_llava
      make_tiny_llava(model_dir, seed=config.seed)
    if config.data_dir == "demo" and not os.path.isdir(data_dir):
      from data_prep.demo import make_demo_dataset
      make_demo_dataset(os.path.dirname(data_dir), copies=config.get("demo_copies", 1))
  if config.model_dir == "tiny" or config.data_dir == "demo":
    multihost_utils.sync_global_devices("promptgen_train demo inputs")
  if not model_dir or not os.path.isdir(model_dir):
    raise FileNotFoundError(f"config.model_dir = {model_dir!r}: LLaVA-NeXT model folder not found")
  for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise FileNotFoundError(f"{os.path.join(model_dir, name)}: missing from the LLaVA-NeXT model folder")
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f"config.data_dir = {data_dir!r}: dataset folder not found")
  return model_dir, data_dir


def frozen_base(frozen, config) -> dict:
  """The frozen tree in its storage form: the decoder's Linear kernels int8 (per channel) or int4 (a scale per
  64 rows) when `config.quantize` says so, every other float leaf in `frozen_dtype`; the LoRA scalars stay fp32."""
  frozen = quantize.quantize_weights(frozen, config.quantize, ln.is_decoder_layer)
  dtype = jnp.dtype(config.frozen_dtype)

  def cast(path, x):
    names = tuple(getattr(k, "key", k) for k in path)
    if lora.is_lora(names) or names[-1] == quantize.SCALE or jnp.issubdtype(x.dtype, jnp.integer):
      return x
    return np.asarray(x).astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, frozen)


def run(config, workdir: str, mesh):
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  dtype = jnp.dtype(config.dtype)

  # ---- Model ---------------------------------------------------------------------------------------------
  quantize.check_format(config.quantize, "config.quantize")  # Before anything loads.
  model_dir, data_dir = _inputs(config, workdir)
  # Read in the storage dtype (no fp32 copy of the 7B on the host); int8 is quantised from those values, as the
  # original quantised its bf16 weights.
  model_config, params = ln.load_pretrained(model_dir, dtype=jnp.dtype(config.frozen_dtype))
  model = ln.LlavaNextForConditionalGeneration(model_config, dtype=dtype, attention_impl=config.attention,
                                               remat_policy=config.remat_policy)
  root_key = jax.random.key(config.seed)
  # Adapters on the language model only: the vision tower's attention has q/k/v_proj too.
  params = dict(params, language_model=lora.init_lora(
      params["language_model"], jax.random.fold_in(root_key, 0), config.lora.rank, config.lora.alpha,
      tuple(config.lora.targets), config.lora.init, config.lora.dropout))
  trainable, frozen = lora.split(jax.device_get(params))
  del params
  adapter_scalars = lora.split(frozen, lambda p: p[-1] in ("lora_scale", "lora_dropout"))[0]
  frozen = frozen_base(frozen, config)

  # ---- Data ----------------------------------------------------------------------------------------------
  source = LlavaSource(data_dir, LlavaConfig(
      split="train", max_concepts=config.max_concepts, masked_area_threshold=config.masked_area_threshold,
      shuffle_concepts=config.shuffle_concepts, only_gray_concept=config.only_gray_concept,
      remove_intersections=config.remove_intersections), seed=config.seed)
  seq_len = config.seq_len or promptgen.default_seq_len(model_config, config.max_length)
  answer_window = config.answer_window or config.max_length - 1
  encoder = promptgen.ExampleEncoder(model_dir, model_config, max_length=config.max_length, seq_len=seq_len,
                                     pixel_dtype=jnp.dtype(dtype).name)
  steps_per_epoch = train_input.steps_per_epoch(len(source), config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  parallel.batch_size_per_process(config.batch_size, mesh)  # Fails early on a batch the mesh cannot split.
  loader = lambda epoch: train_input.epoch_loader(
      source, global_batch=config.batch_size, epoch=epoch, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle=True, worker_count=config.data_workers, transform=encoder)

  # ---- Shardings and state -------------------------------------------------------------------------------
  rules = [tuple(r) for r in config.sharding_rules]
  # Warm-up: 1% of the whole run (SPEC §9; the original's 1 epoch: 28.84 of 2,884 steps).
  tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch,
                                      config.num_epochs * steps_per_epoch)
  frozen = jax.device_put(frozen, parallel.param_shardings(frozen, mesh, rules))
  # Step k's randomness (LoRA dropout): fold_in(fold_in(root, 1), k).
  init = lambda p: train_state.init_state(p, tx, jax.random.fold_in(root_key, 1))
  state_sharding = parallel.param_shardings(jax.eval_shape(init, trainable), mesh, rules)
  state = jax.jit(init, out_shardings=state_sharding)(trainable)
  replicated = parallel.replicated(mesh)
  train_step = jax.jit(promptgen.make_train_step(model, answer_window, tx, schedule), donate_argnums=(0,),
                       out_shardings=(state_sharding, replicated))
  logging.info("promptgen_train: %s LoRA weights (rank %d) on %d Linears; %d train examples, %d steps/epoch, "
               "%d steps; sequence %d tokens, answer window %d; mesh %s", f"{lora.count(trainable):,}",
               config.lora.rank, len(jax.tree.leaves(trainable)) // 2, len(source), steps_per_epoch, total_steps,
               seq_len, answer_window, dict(mesh.shape))
  del trainable

  # ---- Resume, then train ---------------------------------------------------------------------------------
  run = loop.TrainingRun(config, workdir, state, {"epoch": 0}, loader, total_steps, is_main)

  def export_adapter(folder):
    # Every process takes part: with fsdp across hosts no process holds a whole LoRA leaf.
    trained = multihost_utils.process_allgather(run.state.params, tiled=True)
    if is_main:
      ln.save_peft_adapter(folder, lora.merge(trained, adapter_scalars), tuple(config.lora.targets),
                           base_model_name_or_path=config.model_dir)

  # The epoch's adapter at its end (the original saves checkpoint-<step>/adapter).
  epoch = loop.run_epochs(
      run, steps_per_epoch=steps_per_epoch,
      step_fn=lambda state, batch: train_step(state, frozen, parallel.shard_batch(
          train_input.device_fields(batch, promptgen.BATCH_KEYS), mesh)),
      batch_info=lambda batch, epoch, in_epoch: {
          "epoch": epoch + 1, "batch": in_epoch, "stems": [s for s, v in zip(batch["stem"], batch["valid"]) if v]},
      end_of_epoch=lambda run, epoch: export_adapter(os.path.join(workdir, "adapter", f"epoch_{epoch + 1}")),
      close_iterator=train_input.close)
  step = run.step
  export_adapter(os.path.join(workdir, "export", "adapter"))
  run.close()
  summary = {"step": step, "epochs_done": epoch, "workdir": workdir,
             "adapter": os.path.join(workdir, "export", "adapter")}
  logging.info("promptgen_train done: %s", summary)
  return summary

"""LoRA fine-tuning of the (RCA) SD-2 inpainting UNet: SD-2-Inp-RCA-FineTuned and SD-2-Inp-FineTuned (SPEC §5).

`python -m idmp_jax.main --config=configs/rca.py --config.model_dir=/path/stable-diffusion-2-inpainting
 --config.data_dir=/path/mm_inp_dataset --workdir=runs/rca`; `configs/rca.py:demo` runs a tiny random pipeline
on the demo dataset on CPU. The same command resumes from the latest checkpoint in --workdir.

Writes under workdir: checkpoints/<step>/ (Orbax), tensorboard/, metrics.jsonl, lora/epoch_<e>/ (each epoch's
adapter in diffusers' format, written before the early-stopping test, like the original), export/lora/ and
export/unet/ (the final adapter and the merged UNet folder).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from idmp_jax import parallel, schedulers
from idmp_jax.data import InpaintingConfig, data_source_path, load_clip_tokenizer, make_inpainting_source
from idmp_jax.models import clip, lora, unet, vae
from idmp_jax.train import diffusion, input as train_input, loop, optimizer as optim

BATCH_KEYS = ("pixel_values", "masked_pixel_values", "mask", "input_ids", "valid")
RCA_KEYS = ("token_region", "region_masks")


def _inputs(config, workdir: str) -> tuple[str, str]:
  """model_dir and data_dir, as inpaint_sample reads them: model_dir "tiny" is idmp_jax.tiny's random pipeline and
  data_dir "demo" the demo dataset, both built under the workdir (by process 0; the workdir is shared, as Orbax
  needs for multi-host anyway), so a demo run's adapter applies to the sampling demo's pipeline. With
  config.data_format = "array_record" the data is config.array_record_dir's build and data_dir is not read."""
  reads_folder = config.get("data_format", "folder") == "folder"
  model_dir, data_dir = config.model_dir, config.data_dir
  build_demo = reads_folder and data_dir == "demo"
  if model_dir == "tiny":
    model_dir = os.path.join(workdir, "tiny_pipeline")
  if build_demo:
    data_dir = os.path.join(workdir, "demo_data", "mm_inp_dataset")
  if jax.process_index() == 0:
    if config.model_dir == "tiny":
      from idmp_jax import tiny
      tiny.make_tiny_pipeline(model_dir, seed=config.seed)
    if build_demo and not os.path.isdir(data_dir):
      from data_prep.demo import make_demo_dataset
      make_demo_dataset(os.path.dirname(data_dir), copies=config.get("demo_copies", 1))
  if config.model_dir == "tiny" or build_demo:
    multihost_utils.sync_global_devices("inpaint_train demo inputs")
  if not model_dir or not os.path.isdir(model_dir):
    raise FileNotFoundError(f"config.model_dir = {model_dir!r}: folder not found")
  data_source_path(config, data_dir)  # A bad data_format, data_dir or array_record_dir, named before compute.
  return model_dir, data_dir


def _cast(tree, dtype):
  """Frozen weights to the storage dtype (the original keeps them fp16); LoRA scalars stay fp32."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if lora.is_lora(tuple(getattr(k, "key", k) for k in p)) else np.asarray(x).astype(dtype), tree)


def run(config, workdir: str, mesh):
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  dtype, frozen_dtype = jnp.dtype(config.dtype), jnp.dtype(config.frozen_dtype)
  parallel.sharding_rules(config.sharding_rules)  # A bad preset name or rule fails before anything is built.
  frozen_layouts = _frozen_layouts(config)  # So does a bad frozen_layouts.

  model_dir, data_dir = _inputs(config, workdir)
  tokenizer = load_clip_tokenizer(model_dir)

  # ---- Data ----------------------------------------------------------------------------------------------
  data_config = InpaintingConfig(resolution=config.resolution, max_concepts=config.max_concepts,
                                 masked_area_threshold=config.masked_area_threshold,
                                 shuffle_concepts=config.shuffle_concepts,
                                 drop_caption_probability=config.drop_caption_probability, rca=config.rca)
  # The folder or the ArrayRecord build (config.data_format): the same examples either way.
  train_source = make_inpainting_source(config, "train", tokenizer, data_config, data_dir=data_dir, seed=config.seed)
  val_source = make_inpainting_source(config, "val", tokenizer,
                                      dataclasses.replace(data_config, drop_caption_probability=0.0),
                                      data_dir=data_dir, seed=config.seed)

  # ---- Models --------------------------------------------------------------------------------------------
  ucfg, unet_params = unet.load_pretrained(os.path.join(model_dir, "unet"))
  vcfg, vae_params = vae.load_vae(os.path.join(model_dir, "vae"))
  tcfg, text_params = clip.load_text_encoder(os.path.join(model_dir, "text_encoder"))
  ddpm = schedulers.from_config(schedulers.load_scheduler_config(model_dir), class_name="DDPMScheduler")
  prediction_type = config.prediction_type or ddpm.prediction_type
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"config.prediction_type = {config.prediction_type!r}: expected '', 'epsilon' or 'v_prediction'")
  models = diffusion.Models(
      unet=unet.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl=config.attention, remat=config.remat),
      vae=vae.AutoencoderKL(vcfg, dtype=dtype, attention_impl=config.attention),
      text=clip.CLIPTextTransformer(tcfg, attention_impl=config.attention, dtype=dtype),
      vae_config=vcfg, ddpm=ddpm, rca=config.rca, prediction_type=prediction_type,
      noise_offset=config.noise_offset, snr_gamma=config.snr_gamma, vae_batch_chunks=config.vae_batch_chunks)

  root_key = jax.random.key(config.seed)
  params = lora.init_lora(unet_params, jax.random.fold_in(root_key, 0), config.lora.rank, config.lora.alpha,
                          tuple(config.lora.targets), config.lora.init, config.lora.dropout)
  trainable, frozen_unet = lora.split(params)
  del unet_params, params
  frozen = {"unet": _cast(frozen_unet, frozen_dtype),
            "vae": _cast({k: vae_params[k] for k in ("encoder", "quant_conv") if k in vae_params}, frozen_dtype),
            "text": _cast(text_params, frozen_dtype)}
  adapter_scalars = lora.split(frozen_unet, lambda p: p[-1] in ("lora_scale", "lora_dropout"))[0]
  del frozen_unet, vae_params, text_params

  # ---- Input pipeline ------------------------------------------------------------------------------------
  steps_per_epoch = train_input.steps_per_epoch(len(train_source), config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  parallel.batch_size_per_process(config.batch_size, mesh)  # Fails early on a batch the mesh cannot split.
  # Examples shrink in the workers (bf16 pixels, no masked copy, strided region masks): less IPC and transfer.
  compact = functools.partial(train_input.compact, pixel_dtype=jnp.dtype(dtype).name,
                              region_stride=train_input.region_stride(
                                  config.resolution, config.resolution // vcfg.downscale, len(ucfg.block_out_channels)))
  loader = lambda source, epoch, shuffle: train_input.epoch_loader(
      source, global_batch=config.batch_size, epoch=epoch, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle=shuffle, worker_count=config.data_workers, transform=compact)
  batch_keys = BATCH_KEYS + (RCA_KEYS if config.rca else ())

  # ---- Shardings and state -------------------------------------------------------------------------------
  tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch)
  replicated = parallel.replicated(mesh)
  frozen = parallel.FrozenWeights(jax.device_put(frozen, frozen_shardings(frozen, mesh, config)), frozen_layouts)
  # Step k's randomness: fold_in(fold_in(root, 1), k); validation batch i's: fold_in(fold_in(root, 2), i).
  init_state = lambda p: diffusion.init_state(p, tx, jax.random.fold_in(root_key, 1),
                                              flat=optim.flattened(config.optimizer))
  # The LoRA weights and the optimizer state follow the same rules. The "fsdp" preset leaves them replicated:
  # lora_a/lora_b are not kernels, and at rank 16 they are ~3M weights (~10M with both AdamW moments) beside
  # the UNet's 865M, not worth a gather per use.
  state_shardings = parallel.param_shardings(jax.eval_shape(init_state, trainable), mesh,
                                             parallel.sharding_rules(config.sharding_rules),
                                             min_size=config.get("fsdp_min_size", 0))
  state = jax.jit(init_state, out_shardings=state_shardings)(jax.device_put(trainable, replicated))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  parallel.log_param_shardings(frozen.tree, "frozen weights")
  parallel.log_param_shardings(state, "LoRA weights and optimizer state")
  # Both steps take the frozen weights in the layouts XLA chose for the train step (parallel.FrozenWeights).
  train_step = frozen.jit(diffusion.make_train_step(models, tx, schedule), donate_argnums=(0,),
                          out_shardings=(state_sharding, replicated))
  eval_step = frozen.jit(diffusion.make_eval_step(models, state.layout), out_shardings=replicated)
  val_key = jax.random.fold_in(root_key, 2)
  logging.info("inpaint_train: %s LoRA weights (rank %d) on %d attention projections; %d train / %d val examples; "
               "%d steps/epoch, %d steps; mesh %s", f"{lora.count(trainable):,}", config.lora.rank,
               len(jax.tree.leaves(trainable)) // 2,
               len(train_source), len(val_source), steps_per_epoch, total_steps, dict(mesh.shape))

  # ---- Resume, then train ---------------------------------------------------------------------------------
  run = loop.TrainingRun(config, workdir, state, {"epoch": 0, "val_losses": [], "stopped_early": False},
                         lambda epoch: loader(train_source, epoch, True), total_steps, is_main)

  def export_lora(folder):
    if is_main:
      lora.save_diffusers_lora(folder, lora.merge(jax.device_get(run.state.trainable()), adapter_scalars),
                               unet.LIST_NAMES)

  def validate() -> float:
    total, count = 0.0, 0.0
    it = iter(loader(val_source, 0, False))
    for i, batch in enumerate(it):
      s, n = eval_step(run.state.params, parallel.shard_batch(
          train_input.device_fields(batch, batch_keys), mesh), jax.random.fold_in(val_key, i))
      total, count = total + float(s), count + float(n)
    train_input.close(it)
    return total / max(count, 1.0)

  def end_of_epoch(run, epoch):  # Validation, the epoch's adapter, then early stopping (the original's order).
    val_loss = validate()
    run.meta["val_losses"].append(val_loss)
    run.writer.write_scalars(run.step, {"val_loss": val_loss, "epoch": epoch + 1})
    export_lora(os.path.join(workdir, "lora", f"epoch_{epoch + 1}"))
    losses = run.meta["val_losses"]
    if config.early_stopping and len(losses) > 1 and val_loss > losses[-2]:
      logging.info("early stopping after epoch %d: validation loss %.6f > %.6f", epoch + 1, val_loss, losses[-2])
      run.meta["stopped_early"] = True

  epoch = loop.run_epochs(
      run, steps_per_epoch=steps_per_epoch,
      step_fn=lambda state, batch: train_step(state, parallel.shard_batch(
          train_input.device_fields(batch, batch_keys), mesh)),
      batch_info=lambda batch, epoch, in_epoch: {
          "epoch": epoch + 1, "batch": in_epoch,
          "stems": [_name(train_source, i) for i, v in zip(batch["index"], batch["valid"]) if v]},
      end_of_epoch=end_of_epoch, close_iterator=train_input.close)
  state, step, meta = run.state, run.step, run.meta

  # ---- Export --------------------------------------------------------------------------------------------
  export_lora(os.path.join(workdir, "export", "lora"))
  if is_main and config.export_merged_unet:
    _, base = unet.load_pretrained(os.path.join(model_dir, "unet"))  # fp32 base: merge without rounding to bf16
    merged = lora.merge_lora(lora.merge(base, jax.device_get(state.trainable()), adapter_scalars))
    unet.save_pretrained(os.path.join(workdir, "export", "unet"), ucfg, merged)
  run.close()
  frozen_arrays, frozen_sharded = parallel.count_sharded(frozen.tree)
  summary = {"step": step, "epochs_done": epoch, "val_losses": meta["val_losses"],
             "stopped_early": meta["stopped_early"], "workdir": workdir, "frozen_arrays": frozen_arrays,
             "frozen_arrays_sharded": frozen_sharded}
  logging.info("inpaint_train done: %s", summary)
  return summary


def _frozen_layouts(config) -> str:
  layouts = config.get("frozen_layouts", "auto")
  if layouts not in parallel.FrozenWeights.LAYOUTS:
    raise ValueError(f"config.frozen_layouts = {layouts!r}: expected one of {parallel.FrozenWeights.LAYOUTS} ('auto': "
                     "the layouts XLA picks, 'default': row-major)")
  return layouts


def frozen_shardings(frozen, mesh, config):
  """Shardings of the frozen weights ({"unet", "vae", "text"}) from config.sharding_rules (a preset name or
  rules; paths are frozen/unet/..., as the config documents) and config.fsdp_min_size."""
  shardings = parallel.param_shardings({"frozen": frozen}, mesh, parallel.sharding_rules(config.sharding_rules),
                                       min_size=config.get("fsdp_min_size", 0))
  return shardings["frozen"]


def _name(source, index) -> str:
  """An example's stem where the source has stems (folder sources), else its index."""
  stems = getattr(source, "stems", None)
  return stems[int(index)] if stems is not None else f"#{int(index)}"

"""SD-2-Inp-RCA-FineTuned: LoRA fine-tuning of the SD-2 inpainting UNet with regional cross-attention (SPEC §5).

  python -m idmp_jax.main --config=configs/rca.py --workdir=runs/rca \
      --config.model_dir=/path/stable-diffusion-2-inpainting --config.data_dir=/path/mm_inp_dataset

`configs/rca.py:demo` is the same job shrunk for a CPU: idmp_jax.tiny's random pipeline and the demo dataset, both
built under the workdir (no downloads; the demo dataset needs the `demo` extra, scikit-image), 64 px, fp32, 4 steps.
Re-running the same command resumes from the latest checkpoint in the workdir.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "sd2_inp_rca_finetuned"
  c.task = "inpaint_train"
  c.seed = 42                  # The original's seed (it adds the process index; ours is host-count invariant).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 1, "process_id": 0})
  # Weight layout over the mesh: a preset of idmp_jax.parallel.SHARDING_PRESETS ("replicate"; "fsdp": the large
  # frozen kernels split over the fsdp axis, for when the frozen weights do not fit each device), or a tuple of
  # (regex, "replicate" | "fsdp") over '/'-joined paths: frozen/{unet,vae,text}/..., and the LoRA state's
  # params/... and opt_state/... (AdamW's moments end in their weight's path, so they land like it).
  c.sharding_rules = ml_collections.FieldReference("replicate", field_type=object)
  c.fsdp_min_size = 2**16      # "fsdp" leaves with fewer elements replicate (conv_in/out, small projections).
  # Memory layouts of the frozen weights: "auto" = those XLA picks when it compiles the train step (e.g. cuDNN's
  # for conv kernels, saving their per-step transposes), set once; "default" = row-major.
  c.frozen_layouts = "auto"

  c.model_dir = ""             # stable-diffusion-2-inpainting folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/);
                               # "tiny": idmp_jax.tiny's random pipeline, built in the workdir.
  c.data_dir = ""              # mm_inp_dataset root (images/ masks/ entities/); "demo": the demo dataset, built in
                               # the workdir (needs the `demo` extra, scikit-image).
  c.data_format = "folder"     # "folder": data_dir | "array_record": array_record_dir, the same dataset as written by
  c.array_record_dir = ""      # `python -m data_prep build-tfds --out=DIR` (DIR or its version folder); same examples.

  # Data (SPEC §2): the original's training dataset options.
  c.rca = True
  c.resolution = 512
  c.max_concepts = 5
  c.masked_area_threshold = 0.65
  c.shuffle_concepts = True
  c.drop_caption_probability = 0.1
  c.data_workers = 8           # Grain worker processes building examples (0: in the main process).

  # Schedule.
  c.batch_size = 32            # Global batch (over all processes and devices).
  c.num_epochs = 2
  c.max_steps = 0              # > 0: stop after this many steps (smoke runs); 0: num_epochs full epochs.
  c.early_stopping = True      # Stop after an epoch whose validation loss exceeds the previous epoch's.

  # LoRA (peft's LoraConfig in the original).
  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=16.0, dropout=0.05, init="gaussian",
                                          targets=("to_q", "to_k", "to_v", "to_out_0")))
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_fraction_of_epoch=0.01, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2,
      grad_clip=1.0,
      flatten=True))             # The update on the LoRA leaves concatenated: same math, a few kernels, not ~560.
  c.prediction_type = ""       # "" = the scheduler's ("epsilon" for SD-2 inpainting) | "epsilon" | "v_prediction".
  c.noise_offset = 0.0
  c.snr_gamma = 0.0            # > 0: min-SNR-gamma loss weighting.

  # Numerics and memory. Frozen weights are stored in frozen_dtype (the original: fp16); LoRA weights and the
  # optimizer state are always fp32.
  c.dtype = "bfloat16"         # Compute dtype of UNet, VAE and text encoder.
  c.frozen_dtype = "bfloat16"
  c.attention = "auto"         # "auto" (cuDNN on GPU in half precision) | "xla" | "cudnn".
  c.remat = False              # Recompute UNet blocks in the backward pass (less activation memory).
  c.vae_batch_chunks = 1       # Encode the 2B VAE inputs in this many sequential chunks (less peak memory).

  # Checkpoints, logs, export.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.progress_bar = True
  c.export_merged_unet = True  # export/unet: the UNet with the final LoRA folded in (diffusers folder).

  if arg == "demo":
    c.name = c.name + "_demo"
    c.model_dir, c.data_dir = "tiny", "demo"
    c.demo_copies = 1          # Mirrored copies of the demo train images (more steps per epoch).
    c.resolution = 64
    c.batch_size = 2
    c.num_epochs = 2
    c.data_workers = 0
    c.dtype = c.frozen_dtype = "float32"
    c.checkpoint_every_steps = 1
    c.log_every_steps = 1
  elif arg:
    raise ValueError(f"configs/rca.py: unknown argument {arg!r} (expected nothing or 'demo')")
  return c

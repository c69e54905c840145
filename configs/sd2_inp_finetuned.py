"""SD-2-Inp-FineTuned: SD-2-Inp with the LoRA of configs/finetune.py (`--config.lora=.../pytorch_lora_weights.safetensors`)."""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp_finetuned"
  c.rca = False
  c.lora = ""  # Required: the LoRA checkpoint (file or folder).
  return c

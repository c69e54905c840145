"""SD-2-Inp-RCA-FineTuned: RCA with the LoRA of configs/rca.py (`--config.lora=.../pytorch_lora_weights.safetensors`)."""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp_rca_finetuned"
  c.rca = True
  c.lora = ""  # Required: the LoRA checkpoint (file or folder).
  return c

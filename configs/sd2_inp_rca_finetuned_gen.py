"""SD-2-Inp-RCA-FineTuned-Gen: RCA-FineTuned with prompts written by the prompt generator
(`--config.prompts_dir=DIR` holding <stem>.json lists in mask order; a missing folder or file is an error)."""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp_rca_finetuned_gen"
  c.rca = True
  c.lora = ""         # Required: the LoRA checkpoint.
  c.prompts_dir = ""  # Required: generated prompts.
  return c

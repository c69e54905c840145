"""SD-2-Inp-HQPrompt: the base model, "high quality" as the prompt of every image, no RCA (SPEC §6).
`--config.model_dir=.../stable-diffusion-2-inpainting --config.data_dir=.../mm_inp_dataset`"""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp_hqprompt"
  c.rca = False
  c.fixed_prompt = "high quality"
  return c

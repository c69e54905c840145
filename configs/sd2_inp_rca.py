"""SD-2-Inp-RCA: the base model with regional cross-attention, captions packed without periods (SPEC §3, §6)."""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp_rca"
  c.rca = True
  return c

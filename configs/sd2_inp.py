"""SD-2-Inp: the base model, the kept masks' captions packed into one context with periods, no RCA (SPEC §2.8)."""
from idmp_jax.tasks import inpaint_sample


def get_config(arg=None):
  c = inpaint_sample.default_config()
  c.name = "sd2_inp"
  c.rca = False
  return c

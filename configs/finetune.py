"""SD-2-Inp-FineTuned: the same LoRA fine-tuning without regional cross-attention (prompts packed with periods
into one context, SPEC §2.8). Everything else is configs/rca.py's; `configs/finetune.py:demo` likewise.
"""
import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("idmp_configs_rca", os.path.join(os.path.dirname(__file__), "rca.py"))
  rca = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rca)
  c = rca.get_config(arg)
  c.name = "sd2_inp_finetuned" + ("_demo" if arg == "demo" else "")
  c.rca = False
  return c

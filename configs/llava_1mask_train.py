"""LLaVA-1Mask's adapter (SPEC §8, §9): LoRA fine-tuning of llava-v1.6-vicuna-7b-hf on gray-mode examples (the
largest surviving region painted gray, the target is that region's caption in <gray> tags).

  python -m idmp_jax.main --config=configs/llava_1mask_train.py --workdir=runs/llava_1mask \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.data_dir=data/mm_inp_dataset

The adapter lands in runs/llava_1mask/export/adapter (peft format): pass it as `--config.adapter` to
configs/llava_1mask.py. Rerunning the command resumes.
`--config=configs/llava_1mask_train.py:demo`: the tiny random model on the demo dataset, a few CPU steps.
"""
from idmp_jax.tasks import promptgen_train


def get_config(arg=None):
  c = promptgen_train.default_config()
  c.name = "llava_1mask_train"
  c.only_gray_concept = True
  if arg not in (None, "", "demo"):
    raise ValueError(f"configs/llava_1mask_train.py: unknown argument {arg!r} (expected nothing or 'demo')")
  return promptgen_train.demo(c) if arg == "demo" else c

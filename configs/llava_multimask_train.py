"""LLaVA-MultiMask's adapter (SPEC §8, §9): LoRA fine-tuning of llava-v1.6-vicuna-7b-hf on multi-mask examples
(every kept region painted in its colour, the question lists the colours, the target tags every region).

  python -m idmp_jax.main --config=configs/llava_multimask_train.py --workdir=runs/llava_multimask \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.data_dir=data/mm_inp_dataset

The adapter lands in runs/llava_multimask/export/adapter (peft format): pass it as `--config.adapter` to
configs/llava_multimask_all.py and llava_multimask_1pred.py. Rerunning the command resumes.
`--config=configs/llava_multimask_train.py:demo`: the tiny random model on the demo dataset, a few CPU steps.
"""
from idmp_jax.tasks import promptgen_train


def get_config(arg=None):
  c = promptgen_train.default_config()
  c.name = "llava_multimask_train"
  if arg not in (None, "", "demo"):
    raise ValueError(f"configs/llava_multimask_train.py: unknown argument {arg!r} (expected nothing or 'demo')")
  return promptgen_train.demo(c) if arg == "demo" else c

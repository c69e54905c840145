"""LLaVA-MultiMask-All and LLaVA-MultiMask-LastPred (SPEC §8/§9): ONE run serves both rows of the table.
llava-v1.6-vicuna-7b-hf + the MultiMask LoRA adapter; every kept region painted in its colour (the red one asked
last), the question lists the colours, stop at </red>; per colour the text between its first <c> and </c>.
-All scores every region, -LastPred only the last (the red one):

  python -m idmp_jax.main --config=configs/llava_multimask_all.py --workdir=out/llava_multimask \\
      --config.model_dir=models/llava-v1.6-vicuna-7b-hf --config.adapter=models/llava/multimask \\
      --config.data_dir=data/mm_inp_dataset
  python -m eval.prompts --predictions out/llava_multimask/predictions --dataset data/mm_inp_dataset \\
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-MultiMask-All --out out/llava_multimask/eval_all
  python -m eval.prompts --predictions out/llava_multimask/predictions --dataset data/mm_inp_dataset \\
      --clip models/eval/clip-vit-base-patch32 --name LLaVA-MultiMask-LastPred --last-only \\
      --out out/llava_multimask/eval_last

`--config=configs/llava_multimask_all.py:demo`: the tiny random model (no adapter) on the demo dataset.
"""
from idmp_jax.tasks import promptgen_generate


def get_config(arg=None):
  c = promptgen_generate.default_config()
  c.name = "llava_multimask_all"
  c.require_adapter = True  # --config.adapter=<the MultiMask LoRA folder>
  return promptgen_generate.demo(c) if arg == "demo" else c

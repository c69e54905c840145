"""Evaluation of idmp_jax's outputs with the paper's metrics, in PyTorch, from files on disk.

  python -m eval inpainting ...   the multi-mask inpainting table (eval/inpainting.py: inputs, manifest schema)
  python -m eval prompts ...      the prompt-generation table (eval/prompts.py: predictions layout)
  python -m eval table A.json ... several runs' metrics.json as one paper-shaped Markdown table
(`python -m eval.inpainting` and `python -m eval.prompts` work too.)

Metrics follow the original's code and library versions (SPEC §7, §10; torchmetrics 1.4.0). torchmetrics computes
BLEU, ROUGE-L and the Fréchet distance here; the three networks torchmetrics would take from torchvision /
torch-fidelity / piq (none imports beside our torch build) are restated as architectures in eval/fid.py,
eval/lpips.py and eval/clip_iqa.py and read their released weights from local files; CLIPSim uses transformers'
CLIP. PSNR is summed per image (so it can be cached) and pooled like torchmetrics' PeakSignalNoiseRatio (a test
compares the two). `python -m eval.parity` compares the restated networks with the libraries where torchvision
imports. Every model path comes from the command line; nothing is downloaded.
"""

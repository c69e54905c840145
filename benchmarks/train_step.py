"""GPU benchmark of the LoRA fine-tuning step: full SD-2 inpainting shapes, random weights, 512 px, RCA on, bf16.

  python benchmarks/train_step.py                       # batches 16 and 32, both step kinds, on the GPU
  python benchmarks/train_step.py --small               # tiny shapes on CPU: a smoke test of this script
  python benchmarks/train_step.py --batch=32 --kind=full --remat

Two step kinds, timed separately:
  unet  the UNet's LoRA step alone from latents (noise, DDPM add_noise, UNet fwd + bwd with RCA, AdamW): what
        ../shared/BASELINES.md's PyTorch LoRA figures measure (109 img/s at b32 without RCA; 41 img/s at b16 with
        reference-style RCA, OOM at b32).
  full  the job's real step (idmp_jax.train.diffusion.make_train_step): VAE-encode image and masked image (2B
        images at 512 px), CLIP-H text encoder, then the above.
Weights are frozen bf16, LoRA r16 fp32 with fp32 AdamW state, dropout 0.05 on, as in configs/rca.py. Timing: 3
warm-up steps, then the median of --steps timed steps (block_until_ready on each: host dispatch included), and
"pipelined": the median over 3 chains of --steps steps of each chain's mean step time, each step dispatched
before the previous step's output is awaited, as the training loop runs (its metrics are read one step late).
--ab NAME: a paired A/B of two variants compiled in one process, their chains interleaved. Memory: the
executable's own estimate (XLA memory_analysis: arguments + outputs + temporaries - aliased) and the process's peak_bytes_in_use
so far (device memory_stats; monotone over the run, so configs run small to large).
Prints one JSON line per config and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from idmp_jax import parallel, schedulers  # noqa: E402
from idmp_jax.models import clip, lora, unet, vae  # noqa: E402
from idmp_jax.train import diffusion, optimizer as optim, state as train_state, tiny  # noqa: E402
from benchmarks.profile_by_source import profile_by_source  # noqa: E402
from benchmarks.profile_summary import executable_gib, peak_memory_gib, profile_steps  # noqa: E402

SD2_UNET = dict(
    in_channels=9, out_channels=4, sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
               sample_size=768)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", eos_token_id=2)
SMALL_UNET = dict(SD2_UNET, block_out_channels=(32, 64, 64, 64), attention_head_dim=(2, 4, 4, 4),
                  cross_attention_dim=32, norm_num_groups=8)
SMALL_VAE = dict(SD2_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
SMALL_TEXT = dict(SD2_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
REGIONS = 6  # max_concepts + 1


def random_tree(abstract, seed: int, dtype):
  """Random weights made on the host (NumPy; a jitted RNG per leaf takes minutes to compile) -> device."""
  return jax.device_put(jax.tree.map(lambda x: x.astype(dtype), tiny.random_params(abstract, seed)))


def build(small: bool, dtype, attention: str, remat: bool):
  ucfg = unet.UNetConfig.from_dict(dict(SMALL_UNET if small else SD2_UNET), source="benchmark unet")
  vcfg = vae.AutoencoderKLConfig.from_dict(dict(SMALL_VAE if small else SD2_VAE), source="benchmark vae")
  tcfg = clip.CLIPTextConfig(**(SMALL_TEXT if small else SD2_TEXT))
  key = jax.random.key(0)
  abstract_unet = unet.abstract_params(ucfg)
  abstract_vae = jax.eval_shape(lambda: vae.AutoencoderKL(vcfg).init(key, jnp.zeros((1, 8, 8, 3))))["params"]
  abstract_vae = {k: abstract_vae[k] for k in ("encoder", "quant_conv")}
  abstract_text = jax.eval_shape(lambda: clip.CLIPTextTransformer(tcfg).init(key, jnp.zeros((1, 77), jnp.int32)))
  base = random_tree(abstract_unet, 1, jnp.float32)
  params = lora.init_lora(base, jax.random.fold_in(key, 2), 16, 16.0, dropout=0.05)
  del base
  trainable, frozen_unet = lora.split(params)
  frozen_unet = jax.tree_util.tree_map_with_path(
      lambda p, x: x if lora.is_lora(tuple(k.key for k in p)) else x.astype(dtype), frozen_unet)
  frozen = {"unet": frozen_unet, "vae": random_tree(abstract_vae, 3, dtype),
            "text": random_tree(abstract_text["params"], 4, dtype)}
  models = diffusion.Models(
      unet=unet.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl=attention, remat=remat),
      vae=vae.AutoencoderKL(vcfg, dtype=dtype, attention_impl=attention),
      text=clip.CLIPTextTransformer(tcfg, attention_impl=attention, dtype=dtype), vae_config=vcfg,
      ddpm=schedulers.from_config(DDPM, class_name="DDPMScheduler"), rca=True, prediction_type="epsilon")
  return models, trainable, frozen, ucfg


def unet_only_step(models: diffusion.Models, tx, schedule):
  """The UNet part of diffusion.loss_fn (same draws and ops) from given latents and text context, in the job's own
  optimizer step (`train.state.make_train_step`: gradient norm, update, NaN guard)."""

  def loss(trainable, frozen, batch, key):
    k_noise, k_t, k_drop = jax.random.split(key, 3)
    latents = batch["latents"]
    noise = diffusion._normal(k_noise, latents.shape)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, 1000)
    x = jnp.concatenate([models.ddpm.add_noise(latents, noise, t), batch["mask"], batch["masked_latents"]],
                        -1).astype(models.unet.dtype)
    pred = models.unet.apply({"params": lora.merge(trainable, frozen["unet"])}, x, t, batch["context"],
                             region_masks=batch["region_masks"], token_region=batch["token_region"],
                             rngs={lora.DROPOUT_RNG: k_drop})
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - noise)), {}

  return train_state.make_train_step(loss, tx, schedule)


def regions(rng, b, res):
  rm = np.zeros((b, REGIONS, res, res), np.uint8)
  tr = np.zeros((b, 77), np.int32)
  rm[:, 0] = 1
  for i in range(b):
    for r in range(1, 4):
      y, x = rng.integers(0, res // 2, 2)
      rm[i, r] = 1
      rm[i, r, y:y + res // 3, x:x + res // 3] = 0
      rm[i, r] = 1 - rm[i, r]
    tr[i, 1:61] = np.repeat([1, 2, 3], 20)
  return rm, tr


def batch_for(kind, b, res, ucfg, dtype, rng):
  rm, tr = regions(rng, b, res)
  if kind == "full":
    img = rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
    mask = (rng.uniform(size=(b, res, res, 1)) > 0.5).astype(np.float32)
    return dict(pixel_values=img, masked_pixel_values=img * (1 - mask), mask=mask,
                input_ids=rng.integers(0, 49408, (b, 77)).astype(np.int32), valid=np.ones(b, np.float32),
                token_region=tr, region_masks=rm)
  h = res // 8
  return dict(latents=rng.standard_normal((b, h, h, 4)).astype(np.float32),
              masked_latents=rng.standard_normal((b, h, h, 4)).astype(np.float32),
              mask=(rng.uniform(size=(b, h, h, 1)) > 0.5).astype(np.float32),
              context=jnp.asarray(rng.standard_normal((b, 77, ucfg.cross_attention_dim)), dtype),
              token_region=tr, region_masks=rm)


def pipelined_chain(step, state, frozen, batch, steps: int):
  """(state, last output, mean seconds a step) of `steps` steps, each dispatched before the previous one's output is
  awaited, as the training loop runs them (idmp_jax.train.loop.StepMetrics reads metrics one step late)."""
  t0 = time.perf_counter()
  last = out = None
  for _ in range(steps):
    state, out = step(state, frozen, batch)
    if last is not None:
      jax.block_until_ready(last)
    last = out
  jax.block_until_ready(out)
  return state, out, (time.perf_counter() - t0) / steps


def compile_with_layouts(fn, state, frozen, batch, frozen_layout: str):
  """(executable of fn(state, frozen, batch) with the state donated, the frozen tree it takes): as the training job
  compiles its step (`parallel.FrozenWeights`: with "auto" the frozen weights in the layouts XLA picks)."""
  weights = parallel.FrozenWeights(frozen, frozen_layout)
  compiled = weights.compile(fn, state, batch, donate_argnums=0)
  if frozen_layout == "auto":
    formats = compiled.input_formats[0][1]
    pairs = zip(jax.tree.leaves(formats), jax.tree.leaves(frozen))
    changed = sum(f.layout is not None and f.layout.major_to_minor != tuple(range(x.ndim)) for f, x in pairs)
    print(f"frozen layouts: {changed} of {len(jax.tree.leaves(frozen))} arrays not row-major", flush=True)
  return compiled, weights.tree


def measure(step, state, frozen, batch, steps: int, b: int, profile_dir: str = "", frozen_layout: str = "auto"):
  t0 = time.perf_counter()
  compiled, frozen = compile_with_layouts(step, state, frozen, batch, frozen_layout)
  compile_s = time.perf_counter() - t0
  estimate = executable_gib(compiled)
  for _ in range(3):
    state, out = compiled(state, frozen, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, out = compiled(state, frozen, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  # As the training loop runs (idmp_jax.train.loop.StepMetrics): the next step is dispatched before the last
  # one's metrics are read, so the host's dispatch of a step overlaps the device's work on the one before.
  chains = []
  for _ in range(3):
    state, out, seconds = pipelined_chain(compiled, state, frozen, batch, steps)
    chains.append(seconds)
  pipelined = statistics.median(chains)
  peak = peak_memory_gib()
  row = dict(compile_s=round(compile_s, 1), step_ms=round(med * 1e3, 2), img_per_s=round(b / med, 1),
             pipelined_step_ms=round(pipelined * 1e3, 2), pipelined_img_per_s=round(b / pipelined, 1),
             loss=float(out["loss"]), executable_bytes_gib=None if estimate is None else round(estimate, 2),
             peak_bytes_in_use_gib=round(peak or 0.0, 2))
  if profile_dir:  # After the timing, so the profiler's overhead is not in it.
    holder = [state]

    def run_step():
      holder[0], o = compiled(holder[0], frozen, batch)
      jax.block_until_ready(o)
    log_dir = os.path.join(profile_dir, f"b{b}")
    summary = profile_steps(run_step, 3, log_dir)
    row["profile"] = {k: summary[k] for k in ("kernel_ms_per_step", "kinds", "trace")}
    hlo_path = os.path.join(log_dir, "step.hlo.txt")
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(compiled.as_text())
    profile_by_source(summary["trace"], hlo_path, 3)
    state = holder[0]
  return row, state


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny shapes at 64 px (CPU smoke test)")
  ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default 16 32; small: 2)")
  ap.add_argument("--kind", choices=["unet", "full", "both"], default="both")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--attention", default="auto")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--lora-kernels", choices=["auto", "xla"], default="auto",
                  help="lora.KERNELS: auto = the adapters' input side as pallas_lora's kernels on the GPU; xla = XLA's")
  ap.add_argument("--frozen-layout", choices=["config", "default", "auto"], default="config",
                  help="auto: the step compiled with the frozen weights' layouts left to XLA (Layout.AUTO), and the "
                  "weights put in them once (no per-step transposes of conv kernels to cuDNN's layout); default: "
                  "row-major; config: as configs/rca.py sets it (frozen_layouts)")
  ap.add_argument("--flatten", choices=["config", "on", "off"], default="config",
                  help="the optimizer on the LoRA leaves concatenated (optax.flatten; the leaves kept as one "
                  "vector, as the job keeps them) or per leaf; config: as configs/rca.py sets it")
  ap.add_argument("--ab", choices=sorted(AB_VARIANTS), default="",
                  help="a paired A/B of the unet step at the largest --batch: both variants compiled in this "
                  "process, their pipelined chains interleaved (--rounds); flatten: the optimizer flattened or per "
                  "leaf; state: the LoRA leaves kept as one vector or as a tree (optimizer flattened); dx: the "
                  "adapters' dx kernel (pallas_lora.up_grad) on or off; norm: the residual "
                  "LayerNorm's kernels (pallas_norm) or XLA; layout: the frozen weights in XLA's chosen layouts or "
                  "row-major; tile: the LayerNorm kernels with 1024-element tiles and 1 warp or 4096 and 4")
  ap.add_argument("--rounds", type=int, default=6, help="--ab: chains per variant, alternating")
  ap.add_argument("--profile", default="", help="after timing, profile 3 steps into this folder and sum the "
                  "device kernels by kind (benchmarks/profile_summary.py)")
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  lora.KERNELS = args.lora_kernels
  res = 64 if args.small else 512
  batches = args.batch or ([2] if args.small else [16, 32])
  kinds = ["unet", "full"] if args.kind == "both" else [args.kind]
  models, trainable, frozen, ucfg = build(args.small, dtype, args.attention, args.remat)
  n_lora = lora.count(trainable)
  from configs import rca  # The job's own optimizer settings.
  if args.frozen_layout == "config":
    args.frozen_layout = rca.get_config().frozen_layouts
  if args.ab:
    return paired_ab(args, models, trainable, frozen, ucfg, dtype, res, batches)
  opt_config = rca.get_config().optimizer
  if args.flatten != "config":
    opt_config.flatten = args.flatten == "on"
  flat = optim.flattened(opt_config)
  tx, schedule = optim.make_optimizer(opt_config, 2884)
  steps = {"unet": unet_only_step(models, tx, schedule),
           "full": diffusion.make_train_step(models, tx, schedule)}
  rng = np.random.default_rng(0)
  rows = []
  for kind in kinds:
    for b in sorted(batches):
      state = diffusion.init_state(jax.tree.map(jnp.copy, trainable), tx, jax.random.key(0), flat=flat)
      batch = jax.device_put(batch_for(kind, b, res, ucfg, dtype, rng))
      try:
        row, state = measure(steps[kind], state, frozen, batch, args.steps, b,
                             os.path.join(args.profile, kind) if args.profile else "", args.frozen_layout)
      except Exception as e:  # e.g. out of memory: report and go on
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
      row = dict(kind=kind, batch=b, res=res, rca=True, dtype=str(dtype), remat=args.remat,
                 attention=args.attention, lora_kernels=args.lora_kernels, frozen_layout=args.frozen_layout,
                 optimizer_flat=flat,
                 lora_params=n_lora, device=jax.devices()[0].device_kind, **row)
      print(json.dumps(row), flush=True)
      rows.append(row)
      del state, batch
  print(f"\n{'kind':6} {'batch':>5} {'img/s':>8} {'ms/step':>9} {'pipe img/s':>10} {'pipe ms':>8} {'exe GiB':>8} "
        f"{'peak GiB':>9} {'compile s':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['kind']:6} {r['batch']:>5} {r['error']}")
    else:
      print(f"{r['kind']:6} {r['batch']:>5} {r['img_per_s']:>8} {r['step_ms']:>9} {r['pipelined_img_per_s']:>10} "
            f"{r['pipelined_step_ms']:>8} {r['executable_bytes_gib']!s:>8} "
            f"{r['peak_bytes_in_use_gib']:>9} {r['compile_s']:>9}")


def _up_grad_min(n):
  from idmp_jax.models import pallas_lora
  pallas_lora.UP_GRAD_MIN_ADAPTERS = n


def _norm_kernels(mode):
  from idmp_jax.models import layers
  layers.NORM_KERNELS = mode


def _norm_tiling(tile, warps):
  from idmp_jax.models import pallas_norm
  pallas_norm.TILE, pallas_norm.WARPS = tile, warps


def _none():
  pass


# --ab NAME: {variant name: (optimizer form, setup run before tracing that variant's step, frozen layout)}; None:
# as configs/rca.py sets it. Optimizer forms: "flat" (flattened, the LoRA leaves kept as one vector: the job's),
# "flat_tree" (flattened, the leaves kept as a tree), "tree" (per leaf).
AB_VARIANTS = {
    "flatten": {"flat": ("flat", _none, None), "tree": ("tree", _none, None)},
    "state": {"state_flat": ("flat", _none, None), "state_tree": ("flat_tree", _none, None)},
    "dx": {"dx_kernel": (None, lambda: _up_grad_min(2), None),
           "dx_xla": (None, lambda: _up_grad_min(99), None)},
    "norm": {"norm_kernels": (None, lambda: _norm_kernels("auto"), None),
             "norm_xla": (None, lambda: _norm_kernels("xla"), None)},
    "layout": {"layout_auto": (None, _none, "auto"), "layout_default": (None, _none, "default")},
    "tile": {"norm_1024_1": (None, lambda: _norm_tiling(1024, 1), None),
             "norm_4096_4": (None, lambda: _norm_tiling(4096, 4), None)},
}


def paired_ab(args, models, trainable, frozen, ucfg, dtype, res, batches):
  """Two variants of the unet step, both compiled in this process, their pipelined chains (each step dispatched
  before the last is awaited) alternating round by round: a paired A/B, free of the 2-3% by which the lent
  machines differ."""
  from configs import rca
  b = max(batches)
  batch = jax.device_put(batch_for("unet", b, res, ucfg, dtype, np.random.default_rng(0)))
  variants = {}
  for name, (form, setup, frozen_layout) in AB_VARIANTS[args.ab].items():
    setup()  # Module switches are read when the step is traced, i.e. by lower() below.
    opt_config = rca.get_config().optimizer
    if form is not None:
      opt_config.flatten = form != "tree"
    flat = optim.flattened(opt_config)
    tx, schedule = optim.make_optimizer(opt_config, 2884)
    state = diffusion.init_state(jax.tree.map(jnp.copy, trainable), tx, jax.random.key(0),
                                 flat=flat and form != "flat_tree")
    t0 = time.perf_counter()
    step, its_frozen = compile_with_layouts(unet_only_step(models, tx, schedule), state, frozen, batch,
                                            frozen_layout or rca.get_config().frozen_layouts)
    print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(3):
      state, out = step(state, its_frozen, batch)
    jax.block_until_ready(out)
    variants[name] = [step, state, [], float(out["loss"]), its_frozen]
  for _ in range(args.rounds):
    for v in variants.values():
      v[1], _, seconds = pipelined_chain(v[0], v[1], v[4], batch, args.steps)
      v[2].append(seconds)
  (a, va), (c, vc) = variants.items()
  row = dict(kind="unet", batch=b, ab=args.ab, device=jax.devices()[0].device_kind, steps=args.steps,
             **{f"{n}_ms": [round(x * 1e3, 2) for x in v[2]] for n, v in variants.items()},
             **{f"{n}_median_ms": round(statistics.median(v[2]) * 1e3, 2) for n, v in variants.items()},
             **{f"{n}_first_loss": v[3] for n, v in variants.items()},
             paired_diff_median_ms=round(statistics.median(x - y for x, y in zip(va[2], vc[2])) * 1e3, 2),
             diff_is=f"{a} - {c}")
  print(json.dumps(row), flush=True)
  return row


if __name__ == "__main__":
  main()

"""LLaVA-NeXT (vicuna-7b shape) generation throughput with random weights, as BENCHMARKS.md reports.

  python benchmarks/llava.py [--batches 4,32] [--new-tokens 40] [--out results.json]
  python benchmarks/llava.py --small      # CPU smoke test of the script itself

Method: bf16 weights, compute and KV cache; one 672x672 image per row (5 views -> 2928 image tokens) and 96
text tokens = a 3024-token prompt, the same prompt in every row; greedy, no EOS, so every row makes
--new-tokens tokens. A warm-up call compiles; then the median of --iters timed calls with block_until_ready:
  prefill  vision tower + projector + the 3024-token prompt into the cache, and the first token;
  decode   the remaining new tokens (one device while-loop call).
Reported: decode new tokens/s (the steady state the BASELINES ceiling speaks of: weights read once per step),
end-to-end new tokens/s (prefill included, what transformers' generate was timed at), the weights-only
bandwidth bound (datasheet HBM bandwidth: H100 3.35, H200 4.8 TB/s) and the fraction of it reached, and peak
device memory. Note the KV cache a step also reads: 1.6 GB per row at 3064 tokens (6.4 GB at batch 4; half with
--kv-cache int8).
--attention xla also runs the int8-cache decode attention on XLA (default: the Pallas kernel on GPU).
The decoder prefill runs --prefill-rows rows at a time (batch 32 does not fit in 80 GB otherwise).
LoRA training step (--lora-batches): promptgen_train's own step (idmp_jax.train.promptgen.make_train_step with
the job's LoRA recipe and optimizer: r16/alpha16/dropout 0.05 on q/k/v/o/gate/up/down of the decoder, AdamW,
clip 0.5, warm-up schedule), frozen bf16 base, fp32 adapters; the last 64 tokens are the answer, logits over
--answer-window positions (the job's default, max_length - 1 = 511); remat policy --remat over the decoder
layers; reported as prompt tokens/s (batch * 3024 / step time), as BASELINES.md does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The batch-32 KV cache alone is ~51 GB: let JAX's allocator have the card (its default is 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.97")

import jax
import jax.numpy as jnp
import numpy as np

from idmp_jax.models import clip, generation, llama, lora, quantize
from idmp_jax.train import optimizer as optim, promptgen, state as train_state
from idmp_jax.models import llava_next as ln
from benchmarks.profile_summary import executable_gib, peak_memory_gib, profile_steps

# Datasheet HBM bandwidth by card (BASELINES.md's ceiling uses the H100's).
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bytes_per_s() -> float:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), HBM_BYTES_PER_S["H100"])
TEXT_TOKENS = 96
ANSWER_TOKENS = 64


def small_config() -> ln.LlavaNextConfig:
  text = llama.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024)
  vision = clip.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=32, patch_size=8)
  return ln.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=511,
                            image_grid_pinpoints=((32, 64), (64, 32), (64, 64), (96, 32), (32, 96)))


def random_params(config: ln.LlavaNextConfig, dtype, seed: int = 0):
  """Random weights made on the device directly in `dtype` (no fp32 copy of 7B): N(0, 0.02), norms 1, biases 0.
  Leaf by leaf, one small compiled draw per distinct shape (one jit over all leaves compiles for minutes)."""
  draw = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                 static_argnums=1)
  paths, treedef = jax.tree_util.tree_flatten_with_path(ln.abstract_params(config))
  out = []
  for i, (path, leaf) in enumerate(paths):
    name = path[-1].key
    if name == "scale":
      out.append(jnp.ones(leaf.shape, dtype))
    elif name == "bias":
      out.append(jnp.zeros(leaf.shape, dtype))
    else:
      out.append(draw(jax.random.PRNGKey(seed * 100003 + i), tuple(leaf.shape)))
  return jax.tree_util.tree_unflatten(treedef, out)


def make_inputs(config: ln.LlavaNextConfig, batch: int, image_px: int, rng):
  """`batch` copies of one prompt: text tokens around one `<image>` of image_px x image_px (random pixel values:
  the processor's output does not change the timing, and this keeps the script free of the data package)."""
  size = (image_px, image_px)
  n_feat = ln.num_image_features(size, config)
  vocab = config.text_config.vocab_size
  text = [t if t != config.image_token_index else 3 for t in rng.integers(3, vocab, TEXT_TOKENS).tolist()]
  # System, image, then the question and (for the LoRA step) an answer of ANSWER_TOKENS text tokens.
  seq = [1] + text[:10] + [config.image_token_index] * n_feat + text[10:TEXT_TOKENS - 1]
  s = config.vision_config.image_size
  views = ln.num_views(size, config) * batch
  pix = rng.standard_normal((views, 3, s, s), np.float32)
  return {"input_ids": jnp.asarray(np.tile(np.asarray(seq, np.int32), (batch, 1))),
          "attention_mask": jnp.ones((batch, len(seq)), jnp.int32),
          "pixel_values": jnp.asarray(pix, jnp.bfloat16),
          "feature_index": jnp.asarray(ln.image_feature_index([size] * batch, config))}


def bench_generation(args, config, params, results):
  model = ln.LlavaNextForConditionalGeneration(config, dtype=jnp.bfloat16, attention_impl=args.attention)
  lm_bytes = sum(x.size * jnp.iinfo(x.dtype).bits // 8 if jnp.issubdtype(x.dtype, jnp.integer) else x.nbytes
                 for x in jax.tree.leaves(params["language_model"]))  # int4 counted packed (half a byte).
  step_floor = lm_bytes / hbm_bytes_per_s()
  rng = np.random.default_rng(0)
  for batch in args.batches:
    inputs = make_inputs(config, batch, args.image, rng)
    seq_len = int(inputs["input_ids"].shape[1])
    tc = config.text_config  # The KV cache a decode step reads: k and v, every layer, prompt + new tokens.
    vectors = 2 * tc.num_hidden_layers * batch * tc.num_key_value_heads * (seq_len + args.new_tokens)
    cache_bytes = vectors * (tc.head_dim + 4 if args.kv_cache == "int8" else tc.head_dim * 2)  # int8: + fp32 scale
    gen = generation.Generator(model, generation.GenerationConfig(
        max_new_tokens=args.new_tokens, pad_token_id=0, chunk_size=args.new_tokens,
        prefill_rows=math.gcd(batch, args.prefill_rows or batch)), cache_dtype=args.kv_cache or None)
    try:
      t0 = time.perf_counter()
      tokens, _ = gen(params, inputs)  # Warm-up: compiles prefill and decode for this shape.
      compile_s = time.perf_counter() - t0
      prefill_t, decode_t = [], []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        state = jax.block_until_ready(gen.prefill(params, inputs))
        t1 = time.perf_counter()
        state = jax.block_until_ready(gen.decode(params, state))
        t2 = time.perf_counter()
        prefill_t.append(t1 - t0)
        decode_t.append(t2 - t1)
        assert int(state["step"]) == args.new_tokens
      del state
    except Exception as e:  # noqa: BLE001 -- an out-of-memory batch is a result, not a crash.
      msg = str(e).splitlines()[0][:200]
      print(f"batch {batch}: FAILED ({type(e).__name__}: {msg})", flush=True)
      print("\n".join(traceback.format_exc().splitlines()[-40:]), flush=True)
      results.append({"bench": "generate", "batch": batch, "error": f"{type(e).__name__}: {msg}"})
      continue
    if args.profile:  # One decode call under the profiler, after the timing; kernels summed per decode step.
      profile_decode(gen, params, inputs, os.path.join(args.profile, f"decode_b{batch}"), args.new_tokens - 1)
    p, d = statistics.median(prefill_t), statistics.median(decode_t)
    steps = args.new_tokens - 1
    row = {
        "bench": "generate", "batch": batch, "prompt_tokens": seq_len, "new_tokens": args.new_tokens,
        "prefill_s": p, "decode_s": d, "decode_ms_per_step": 1e3 * d / steps,
        "decode_new_tokens_per_s": batch * steps / d, "end_to_end_new_tokens_per_s": batch * args.new_tokens / (p + d),
        "weights_only_bound_tokens_per_s": batch / step_floor, "fraction_of_bound": step_floor / (d / steps),
        "weights_and_cache_bound_tokens_per_s": batch / (step_floor + cache_bytes / hbm_bytes_per_s()),
        "lm_weight_gb": lm_bytes / 1e9, "kv_cache": args.kv_cache or "bf16", "cache_gb": cache_bytes / 1e9,
        "weights": args.quantize or "bf16", "warmup_s": compile_s, "peak_gib": peak_memory_gib(),
        "first_tokens": tokens[0, :8].tolist(),
    }
    results.append(row)
    print(json.dumps(row), flush=True)


def profile_decode(gen, params, inputs, log_dir: str, steps: int) -> None:
  """Prints where a decode step's device time goes (benchmarks/profile_summary.py): GEMVs, attention, the rest."""
  state = jax.block_until_ready(gen.prefill(params, inputs))  # Donated to the one decode call below.
  profile_steps(lambda: jax.block_until_ready(gen.decode(params, state)), 1, log_dir, top=25, steps_per_call=steps)


def lora_inputs(config: ln.LlavaNextConfig, batch: int, image_px: int, rng) -> dict:
  """The training step's fields (idmp_jax.train.promptgen) for `batch` copies of make_inputs' prompt, its last
  ANSWER_TOKENS tokens being the answer; one image per row, its views in the row."""
  flat = make_inputs(config, batch, image_px, rng)
  size = (image_px, image_px)
  ids = np.asarray(flat["input_ids"])
  # Targets must be text: an image token id (32000) is no output of a 32000-word head, and its cross-entropy is
  # NaN (what made this benchmark's loss NaN until the answer no longer reached into the image tokens).
  assert (ids[:, -ANSWER_TOKENS - 1:] != config.image_token_index).all()
  row_index = np.zeros(ids.shape, np.int32)
  row_index[ids == config.image_token_index] = np.tile(ln.image_feature_index([size], config), batch)
  views = ln.num_views(size, config)
  assert views == promptgen.max_views(config)  # A pinpoint's own size: no padding views, newline index as is.
  pix = np.asarray(flat["pixel_values"].astype(jnp.float32)).reshape((batch, views) + flat["pixel_values"].shape[1:])
  return {"input_ids": flat["input_ids"], "attention_mask": flat["attention_mask"],
          "pixel_values": jnp.asarray(pix, jnp.bfloat16), "row_feature_index": jnp.asarray(row_index),
          "answer_start": jnp.full((batch,), ids.shape[1] - ANSWER_TOKENS, jnp.int32),
          "answer_length": jnp.full((batch,), ANSWER_TOKENS, jnp.int32), "valid": jnp.ones((batch,), jnp.float32)}


def quantized_decoder(params, fmt: str):
  """params with the decoder layers' kernels in `fmt` (models/quantize.py, on the host; "" = unchanged)."""
  if not fmt:
    return params
  lm = quantize.quantize_weights(jax.device_get(params["language_model"]), fmt, lambda p: "layers" in "/".join(p))
  return dict(params, language_model=jax.device_put(lm))


def bench_lora(args, config, params, results):
  """The job's own step (promptgen_train: idmp_jax.train.promptgen.make_train_step with the job's optimizer and
  LoRA recipe), on the frozen bf16 base, or its decoder kernels int8/int4 with --lora-quantize (QLoRA)."""
  from idmp_jax.tasks import promptgen_train
  job = promptgen_train.default_config()
  model = ln.LlavaNextForConditionalGeneration(config, dtype=jnp.bfloat16, attention_impl=args.attention,
                                               remat_policy=args.remat)
  adapted = lora.init_lora(params["language_model"], jax.random.PRNGKey(1), job.lora.rank, job.lora.alpha,
                           tuple(job.lora.targets), job.lora.init, job.lora.dropout)
  trainable, frozen = lora.split(dict(params, language_model=adapted))
  frozen = quantized_decoder(frozen, args.lora_quantize)  # QLoRA, as promptgen_train's `quantize` does.
  tx, schedule = optim.make_optimizer(job.optimizer, steps_per_epoch=2884, total_steps=2884)
  step = jax.jit(promptgen.make_train_step(model, args.answer_window, tx, schedule,
                                           right_padded=not args.explicit_mask), donate_argnums=(0,))
  rng = np.random.default_rng(1)
  for batch in args.lora_batches:
    inputs = lora_inputs(config, batch, args.image, rng)
    seq_len = int(inputs["input_ids"].shape[1])
    try:
      state = train_state.init_state(jax.tree.map(jnp.copy, trainable), tx, jax.random.key(0))
      t0 = time.perf_counter()
      compiled = step.lower(state, frozen, inputs).compile()
      exe_gib = executable_gib(compiled)
      state, m = compiled(state, frozen, inputs)
      loss0 = float(m["loss"])  # The first step's loss (before any update).
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.iters + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, frozen, inputs)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
      del state
    except Exception as e:  # noqa: BLE001 -- out of memory at a batch is a result.
      msg = str(e).splitlines()[0][:200]
      print(f"LoRA batch {batch}: FAILED ({type(e).__name__}: {msg})", flush=True)
      results.append({"bench": "lora_step", "batch": batch, "remat": args.remat,
                      "error": f"{type(e).__name__}: {msg}"})
      continue
    t = statistics.median(times[1:])
    row = {"bench": "lora_step", "batch": batch, "remat": args.remat, "explicit_mask": args.explicit_mask,
           "attention": args.attention, "seq_len": seq_len, "step_s": t,
           "tokens_per_s": batch * seq_len / t, "loss_first": loss0, "loss_last": float(m["loss"]),
           "answer_window": args.answer_window, "weights": args.lora_quantize or "bf16", "warmup_s": compile_s,
           "trainable": lora.count(trainable),
           "executable_gib": exe_gib, "peak_gib": peak_memory_gib()}
    results.append(row)
    print(json.dumps(row), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny config on CPU: checks the script runs")
  parser.add_argument("--batches", default="4,32")
  parser.add_argument("--new-tokens", type=int, default=40)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--prefill-rows", type=int, default=2, help="decoder prefill rows at a time (0 = all)")
  parser.add_argument("--lora-batches", default="1,4", help="'' to skip the LoRA step")
  parser.add_argument("--remat", default="dots", choices=tuple(llama.REMAT_POLICIES))
  parser.add_argument("--answer-window", type=int, default=511, help="positions whose logits the loss computes")
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
  parser.add_argument("--quantize", default="", choices=("", "int8", "int4"),
                      help="generation with the decoder's Linear kernels per-channel int8, or int4 with a scale per "
                           "64 rows (models/quantize.py): half (a quarter) of the weight bytes a decode step reads")
  parser.add_argument("--lora-quantize", default="", choices=("", "int8", "int4"),
                      help="LoRA step over a quantised frozen decoder (promptgen_train's `quantize`)")
  parser.add_argument("--kv-cache", default="", choices=("", "int8"),
                      help="generation with an int8 KV cache (one fp32 scale per cached vector; llama.init_cache)")
  parser.add_argument("--explicit-mask", action="store_true",
                      help="LoRA step: attention with a (T, T) mask tensor instead of plain causal (right padding)")
  parser.add_argument("--layers", type=int, default=0, help="override the decoder depth (quick experiments)")
  parser.add_argument("--profile", default="", help="after timing each generation batch, profile one decode call "
                      "into this folder and print its kernels per decode step")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  args.batches = [int(b) for b in args.batches.split(",") if b]
  args.lora_batches = [int(b) for b in args.lora_batches.split(",") if b]
  if args.small:
    config, args.image = small_config(), 64
    args.batches, args.new_tokens, args.iters, args.prefill_rows = [2, 4], 6, 1, 2
    args.lora_batches = [2] if args.lora_batches else []
    args.answer_window = min(args.answer_window, ANSWER_TOKENS)
  else:
    config, args.image = ln.LlavaNextConfig(), 672
  if args.layers:
    config = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config,
                                                                         num_hidden_layers=args.layers))
  print(f"devices: {jax.devices()}", flush=True)
  t0 = time.perf_counter()
  params = jax.block_until_ready(random_params(config, jnp.bfloat16))
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"random params: {n / 1e9:.2f}B in {time.perf_counter() - t0:.1f}s", flush=True)
  results = []
  gen_params = quantized_decoder(params, args.quantize)  # As promptgen_generate's `quantize` does.
  bench_generation(args, config, gen_params, results)
  del gen_params
  bench_lora(args, config, params, results)
  print(f"\n{'batch':>5} {'prompt':>6} {'prefill s':>9} {'ms/step':>8} {'decode tok/s':>12} {'e2e tok/s':>9} "
        f"{'w+c bound':>9} {'frac':>5} {'peak GiB':>8}")
  for r in results:
    if r["bench"] != "generate":
      continue
    if "error" in r:
      print(f"{r['batch']:>5} {r['error']}")
      continue
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    print(f"{r['batch']:>5} {r['prompt_tokens']:>6} {r['prefill_s']:>9.3f} {r['decode_ms_per_step']:>8.2f} "
          f"{r['decode_new_tokens_per_s']:>12.0f} {r['end_to_end_new_tokens_per_s']:>9.0f} "
          f"{r['weights_and_cache_bound_tokens_per_s']:>9.0f} "
          f"{r['decode_new_tokens_per_s'] / r['weights_and_cache_bound_tokens_per_s']:>5.2f} {peak:>8}")
  lora_rows = [r for r in results if r["bench"] == "lora_step"]
  if lora_rows:
    print(f"\n{'LoRA b':>6} {'base':>5} {'remat':>5} {'step s':>7} {'tok/s':>7} {'exe GiB':>8} {'peak GiB':>8} "
          f"{'loss first/last':>16}")
  for r in lora_rows:
    if "error" in r:
      print(f"{r['batch']:>6} {args.lora_quantize or 'bf16':>5} {r['remat']:>5} {r['error']}")
      continue
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    exe = f"{r['executable_gib']:.1f}" if r["executable_gib"] is not None else "-"
    print(f"{r['batch']:>6} {r['weights']:>5} {r['remat']:>5} {r['step_s']:>7.3f} {r['tokens_per_s']:>7.0f} {exe:>8} "
          f"{peak:>8} {r['loss_first']:>7.3f}/{r['loss_last']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()

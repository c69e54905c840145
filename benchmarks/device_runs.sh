#!/usr/bin/env bash
# The GPU measurements still open (BENCHMARKS.md, "Not measured yet"), as this workplace's device tool runs them:
# few, full calls, each step in its own time box, logs under $OUT.
#
#   bash benchmarks/device_runs.sh prepare     # here, on the CPU machine: wheels and inputs into .whl/ and .bench/
#   bash benchmarks/device_runs.sh unet        # on the GPU machine (carry .whl): b32 step with VAE + text encoder; UNet forward
#   bash benchmarks/device_runs.sh llava       # on the GPU machine (carry .whl): QLoRA (int4) step b4/b12
#   bash benchmarks/device_runs.sh decode      # on the GPU machine (carry .whl): int8 decode profiles, b4 and b32
#   bash benchmarks/device_runs.sh kernels     # on the GPU machine (carry .whl): int8 matmul layouts, attention b32
#   bash benchmarks/device_runs.sh glue        # on the GPU machine (carry .whl): LoRA dropout glue, bytes vs hash
#   bash benchmarks/device_runs.sh data        # on the GPU machine (carry .whl and .bench): folder vs ArrayRecord
#   bash benchmarks/device_runs.sh norms BASE [LAYERS.py ...]  # on the GPU machine (carry .whl, BASE, the rest):
#       XLA's streaming rate, the UNet's norms and GEGLU against BASE's (git archive REV idmp_jax benchmarks configs)
#       and other layers.py variants, the b32 step
#   bash benchmarks/device_runs.sh flags 'FLAGS1' 'FLAGS2' ...  # on the GPU machine (carry .whl): probe + b32 step per set
#   bash benchmarks/device_runs.sh profile     # on the GPU machine (carry .whl): b32 step profiled by model source;
#       the UNet's attention calls alone
#   bash benchmarks/device_runs.sh attention   # on the GPU machine (carry .whl): the UNet's attention calls on cuDNN,
#       the Pallas few-key kernel (tilings) and Mosaic GPU flash attention; the b32 step, auto vs cuDNN only
#   bash benchmarks/device_runs.sh lora        # on the GPU machine (carry .whl): the b32 step with the LoRA
#       input-side kernels, with XLA's path, with Layout.AUTO frozen weights; the kernels alone against XLA
#   bash benchmarks/device_runs.sh dx          # on the GPU machine (carry .whl): the LoRA kernels alone (64x64, 32x32
#       levels, with dx), then the b32 step
#   bash benchmarks/device_runs.sh layouts     # on the GPU machine (carry .whl): the b32 step with the frozen
#       weights in XLA's layouts (Layout.AUTO) and in the default ones
#   bash benchmarks/device_runs.sh final       # on the GPU machine (carry .whl): the b32 step, then its profile
#       without CUDA graphs summed by model source
#   bash benchmarks/device_runs.sh graphs      # on the GPU machine (carry .whl): the b32 step with XLA's CUDA graphs
#       (command buffers, the default) and without them
#   bash benchmarks/device_runs.sh pair NAME   # on the GPU machine (carry .whl): train_step.py --ab NAME, a paired
#       A/B of the b32 step in one process (flatten: the optimizer flattened or per leaf; dx: the adapters' dx kernel)
#   bash benchmarks/device_runs.sh norm [AB]   # on the GPU machine (carry .whl): the residual LayerNorm's kernels
#       alone against XLA (norm_kernels_probe.py), then train_step.py --ab AB (default norm)
#   bash benchmarks/device_runs.sh pairs NAME...  # on the GPU machine (carry .whl): train_step.py --ab NAME for each
#       NAME, ~3 min each
#   bash benchmarks/device_runs.sh geglu       # on the GPU machine (carry .whl): the feed-forward's GEGLU kernels alone
#       against XLA (geglu_probe.py)
#   bash benchmarks/device_runs.sh long        # on the GPU machine (carry .whl): the b16 and b32 step, 30-step chains
#       (BATCHES="32": b32 only)
#   bash benchmarks/device_runs.sh rates       # on the GPU machine (carry .whl): the b32 step's profile without CUDA
#       graphs by source, and each kernel's distance from a hardware rate (profile_rates.py)
#   bash benchmarks/device_runs.sh ab BASE [nocb]  # on the GPU machine (carry .whl, BASE): the b32 step of this tree
#       and of BASE (git archive REV idmp_jax benchmarks configs), back to back; nocb: then this tree's step
#       profiled without CUDA graphs (each kernel named by its HLO op) and summed by model source
#
# .whl/ and .bench/ must be ignored (.git/info/exclude) so that they travel only when carried.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: device_runs.sh prepare|unet|llava|decode|kernels|glue|data|norms|flags}"

wheels() {  # The GPU image lacks these (device README); its python is 3.12.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
}

boxed() {  # boxed SECONDS NAME command...: one step, stack dump on timeout, log to $OUT/NAME.log
  local seconds=$1 name=$2
  shift 2
  date -u
  PYTHONUNBUFFERED=1 timeout -s ABRT "$seconds" "$@" 2>&1 | tee "${OUT:-/tmp}/$name.log"
}

case "$step" in
  prepare)
    mkdir -p .whl .bench
    for p in diffusers==0.42.1 ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker clu==0.0.12; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$p"
    done
    python -m data_prep make-demo-dataset --out-dir .bench/demo --copies 24
    python -c "from tests.tiny_clip_tokenizer import make_clip_tokenizer_folder as m; m('.bench/tokenizer')"
    rm -rf .bench/demo1024 && cp -r .bench/demo .bench/demo1024
    python -c "from benchmarks.data_pipeline import rescale; rescale('.bench/demo1024/mm_inp_dataset', 'train', 1024)"
    python -m data_prep build-tfds --data-dir .bench/demo/mm_inp_dataset --out .bench/tfds
    python -m data_prep build-tfds --data-dir .bench/demo1024/mm_inp_dataset --out .bench/tfds1024
    du -sh .whl .bench ;;
  unet)  # ~8 min on an H200: the b32 LoRA step with the VAE and text encoder in it (--kind full); UNet forward rows
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 300 train_step_full python3 -X faulthandler benchmarks/train_step.py --kind full --batch 32
    boxed 180 unet_forward python3 -X faulthandler benchmarks/unet_forward.py --batches 8,16 --impls cudnn ;;
  llava)  # ~5 min on an H200: the QLoRA step (int4 base) at b4 and b12
    wheels || exit 1
    boxed 300 llava_qlora python3 -X faulthandler benchmarks/llava.py --batches '' --lora-batches 4,12 \
      --lora-quantize int4 ;;
  decode)  # ~5 min: profiles (kernels and the timeline's idle gaps) of the int8 decode step at b4 and b32
    wheels || exit 1
    boxed 300 decode_profiles python3 -X faulthandler benchmarks/llava.py --quantize int8 --kv-cache int8 \
      --batches 4,32 --lora-batches '' --iters 5 --profile /tmp/llava_profile ;;
  kernels)  # ~4 min: the int8 matmul in both kernel layouts at 4 and 32 rows; the attention tilings at b32
    wheels || exit 1
    boxed 200 int8_matmul python3 -X faulthandler benchmarks/int8_matmul_sweep.py --rows 4,32
    boxed 150 attention_b32 python3 -X faulthandler benchmarks/decode_attention_sweep.py --rows 32 ;;
  glue)  # ~1 min: is the UNet adapters' dropout glue bound by bytes or by the mask's hash (issue 5)?
    wheels || exit 1
    boxed 120 lora_dropout python3 -X faulthandler benchmarks/lora_dropout_sweep.py ;;
  norms)  # ~8 min: XLA's streaming rate under flag variants; the UNet's norms and GEGLU at b32 (this tree's
    # layers.py against BASE's and any further layers.py given after it); the b32 LoRA step, with and without
    # the unroll flag
    base="${2:?norms needs the BASE folder}"
    shift 2
    wheels || exit 1
    unroll=--xla_gpu_experimental_max_unroll_factor=8
    for flags in "" "$unroll"; do
      XLA_FLAGS="$flags" boxed 60 "probe${flags:+_unroll8}" python3 -X faulthandler benchmarks/bandwidth_probe.py
    done
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 200 unet_glue_sweep python3 -X faulthandler benchmarks/unet_glue_sweep.py \
      --compare "$base/idmp_jax/models/layers.py" "$@" --hlo "${OUT:-/tmp}/hlo" --profile /tmp/glue_prof
    boxed 170 train_step_this python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32
    XLA_FLAGS="$XLA_FLAGS $unroll" boxed 170 train_step_unroll8 python3 -X faulthandler benchmarks/train_step.py \
      --kind unet --batch 32 ;;
  flags)  # ~3 min per flag set: XLA's streaming rate and the b32 LoRA step under each XLA_FLAGS set given
    shift
    wheels || exit 1
    i=0
    for flags in "$@"; do
      i=$((i + 1))
      echo "flag set $i: $flags"
      XLA_FLAGS="--xla_gpu_autotune_level=2 $flags" boxed 60 "probe_flags$i" python3 -X faulthandler \
        benchmarks/bandwidth_probe.py && \
      XLA_FLAGS="--xla_gpu_autotune_level=2 $flags" boxed 170 "train_step_flags$i" python3 -X faulthandler \
        benchmarks/train_step.py --kind unet --batch 32
    done ;;
  profile)  # ~6 min: the b32 LoRA step timed and profiled, its kernels summed by the model code they come from
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 120 attention_probe python3 -X faulthandler benchmarks/attention_probe.py
    boxed 280 train_step_profile python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --profile /tmp/step_profile
    gzip -c /tmp/step_profile/unet/b32/step.hlo.txt > "${OUT:-/tmp}/step.hlo.txt.gz"
    cp "$(find /tmp/step_profile -name perfetto_trace.json.gz | head -1)" "${OUT:-/tmp}/" ;;
  attention)  # ~10 min (the probe ran past 150 s with three Pallas tilings on 2026-12-02)
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 240 attention_probe python3 -X faulthandler benchmarks/attention_probe.py --iters 10 \
      --pallas-configs 64,0,4,2,64,0,8,2 128,0,8,2,128,0,8,2 64,0,4,2,64,1,8,2
    boxed 100 attention_mgpu_probe python3 -X faulthandler benchmarks/attention_mgpu_probe.py
    boxed 170 train_step_auto python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32
    boxed 170 train_step_cudnn python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --attention cudnn ;;
  lora)  # ~9 min: the b32 step with pallas_lora's kernels, with XLA's adapter path, and with the frozen weights in
    # XLA's chosen layouts (Layout.AUTO); then the adapters' input side alone, XLA against the kernels
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 150 train_step_kernels python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32
    boxed 150 train_step_xla python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --lora-kernels xla
    boxed 150 train_step_auto_layout python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --frozen-layout auto
    boxed 100 lora_kernels_probe python3 -X faulthandler benchmarks/lora_kernels_probe.py --configs 0,2 ;;
  dx)  # ~3.5 min: the adapters' kernels alone against XLA at the 64x64 and 32x32 levels (with dx), then the b32 step
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 70 lora_kernels_probe python3 -X faulthandler benchmarks/lora_kernels_probe.py --levels 2 --configs 0,2 \
      --iters 10
    boxed 150 train_step_kernels python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 ;;
  layouts)  # ~5 min: the b32 step with the frozen weights in XLA's chosen layouts (Layout.AUTO) and in the
    # default row-major ones
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 150 train_step_auto_layout python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --frozen-layout auto
    boxed 150 train_step_default python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 ;;
  final)  # ~5 min
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 150 train_step python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32
    XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_command_buffer=" boxed 170 train_step_nocb_profile python3 \
      -X faulthandler benchmarks/train_step.py --kind unet --batch 32 --steps 3 --profile /tmp/step_profile
    gzip -c /tmp/step_profile/unet/b32/step.hlo.txt > "${OUT:-/tmp}/step.hlo.txt.gz"
    cp "$(find /tmp/step_profile -name perfetto_trace.json.gz | head -1)" "${OUT:-/tmp}/" ;;
  graphs)  # ~5 min: the b32 LoRA step with CUDA graphs (XLA's default command buffers), then without
    wheels || exit 1
    boxed 200 train_step_graphs env XLA_FLAGS=--xla_gpu_autotune_level=2 python3 -X faulthandler \
      benchmarks/train_step.py --kind unet --batch 32
    boxed 200 train_step_nographs env XLA_FLAGS="--xla_gpu_autotune_level=2 --xla_gpu_enable_command_buffer=" \
      python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 ;;
  pair)  # ~4 min
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 400 "train_step_ab_$2" python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --ab "$2" --rounds 8 ;;
  pairs)  # ~3 min per A/B
    shift
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    for name in "$@"; do
      boxed 280 "train_step_ab_$name" python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
        --ab "$name" --rounds 8
    done ;;
  norm)  # ~9 min: the residual LayerNorm's kernels alone against XLA (layouts and tilings, 3 levels, interleaved
    # rounds), then the b32 step's paired A/B (train_step.py --ab ${2:-norm})
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 230 norm_kernels python3 -X faulthandler benchmarks/norm_kernels_probe.py --levels 3
    boxed 330 "train_step_ab_${2:-norm}" python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 \
      --ab "${2:-norm}" --rounds 8 ;;
  geglu)  # ~3 min: the feed-forward's Hopper GEGLU kernel (benchmarks/geglu_kernels.py) against XLA (its tilings,
    # chained pipelines or not, 3 levels; the Triton kernels, measured 2026-12-03, left out)
    wheels || exit 1
    boxed 300 geglu_kernels python3 -X faulthandler benchmarks/geglu_probe.py --tilings ;;
  long)  # ~5 min: the b16 and b32 step, 30-step pipelined chains (the training loop's steady state: a 10-step
    # chain carries ~0.5 ms a step of its first dispatch)
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    # shellcheck disable=SC2086  # BATCHES (default "16 32") is a list of batch sizes.
    boxed 400 train_step_long python3 -X faulthandler benchmarks/train_step.py --kind unet --batch ${BATCHES:-16 32} \
      --steps 30 ;;
  rates)  # ~3.5 min: the b32 step profiled without CUDA graphs, summed by source and by distance from a hardware
    # rate (benchmarks/profile_rates.py)
    wheels || exit 1
    XLA_FLAGS="--xla_gpu_autotune_level=2 --xla_gpu_enable_command_buffer=" boxed 220 train_step_nocb_profile \
      python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32 --steps 3 --profile /tmp/step_profile
    trace="$(find /tmp/step_profile -name perfetto_trace.json.gz | head -1)"
    boxed 60 profile_rates python3 benchmarks/profile_rates.py "$trace" /tmp/step_profile/unet/b32/step.hlo.txt
    gzip -c /tmp/step_profile/unet/b32/step.hlo.txt > "${OUT:-/tmp}/step.hlo.txt.gz"
    cp "$trace" "${OUT:-/tmp}/" ;;
  ab)  # ~3 min per step: an A/B of the b32 LoRA step against BASE's tree
    base="${2:?ab needs the BASE folder}"
    wheels || exit 1
    export XLA_FLAGS=--xla_gpu_autotune_level=2
    boxed 200 train_step_this python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32
    (cd "$base" && boxed 200 train_step_base python3 -X faulthandler benchmarks/train_step.py --kind unet --batch 32)
    if [ "${3:-}" = nocb ]; then
      XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_command_buffer=" boxed 220 train_step_nocb_profile python3 \
        -X faulthandler benchmarks/train_step.py --kind unet --batch 32 --steps 3 --profile /tmp/step_profile
      gzip -c /tmp/step_profile/unet/b32/step.hlo.txt > "${OUT:-/tmp}/step.hlo.txt.gz"
      cp "$(find /tmp/step_profile -name perfetto_trace.json.gz | head -1)" "${OUT:-/tmp}/"
    fi ;;
  data)  # ~4 min
    wheels || exit 1
    for size in "" 1024; do
      boxed 150 "tfds$size" python3 -X faulthandler benchmarks/tfds_pipeline.py \
        --data-dir ".bench/demo$size/mm_inp_dataset" --tokenizer .bench/tokenizer \
        --build-dir ".bench/tfds$size/idmp_inpainting/1.0.0" --workers 16 --batches 150 --rounds 2 --watchdog 120
    done ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac

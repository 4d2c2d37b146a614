#!/usr/bin/env bash
# Everything this project needs a GPU for, in one call on a lent device machine (repo root),
# in priority order under one time budget: kernel correctness at full size, the kernel
# benchmark, the BERT-base step benchmark, the bf16 influence cosine on CUDA, the README's
# main command (bf16, ZeRO-2) and a ZeRO-3-teacher run through the deepspeed launcher, and the
# decoder-1b preset (tokens/s and peak memory per method: LGTM vs online KD at teacher ~10x
# student), then the later features at small size: an on-policy run with a LoRA teacher (bf16,
# ZeRO-3, generation inside the step) and the LoRA memory table on CUDA. Results (a log per step, CSV rows, steps.tsv: name, exit code, seconds, limit) go
# to $OUT. A step that would start with under 20 s left is skipped and says so in steps.tsv.
# No GPU has run this yet.
#
# Prepare the wheels here first (the device has torch + triton, not deepspeed/transformers;
# the device tool carries at most 64 MiB with the tree: this set is 27 MB, measured 0.9):
#   echo /.whl/ >> "$(git rev-parse --git-dir)/info/exclude"
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .whl hjson pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions transformers tokenizers safetensors huggingface-hub \
#     pyyaml tqdm regex filelock fsspec packaging ninja py-cpuinfo psutil msgpack einops \
#     pytest pluggy iniconfig pytest-timeout peft accelerate
# then call the device tool with: bash launch/gpu_check.sh   (carry: [".whl"], timeout_s 600)
# Not in the set: `datasets` (with pyarrow 55 MB and pandas 12 MB it would not fit), which
# influence_precision and the two training runs need: they run where the device has it
# ($OUT/pip_list.txt says), else steps.tsv lists them as skipped. bench_step builds its models
# and batches without it.
#
# LGTM_GPU_BUDGET_S: seconds for the whole call (default 540: the device call's 600 s limit
# minus the wheel install and a margin). LGTM_GPU_DRYRUN=1: every step at CPU toy size
# (checks the script's plumbing here; the kernel steps fail without CUDA, which is expected).
set -u
OUT=${OUT:-/tmp/lgtm_gpu_out}
BUDGET=${LGTM_GPU_BUDGET_S:-540}
DRY=${LGTM_GPU_DRYRUN:-}
case $BUDGET in
  '' | *[!0-9]*)
    echo "gpu_check.sh: LGTM_GPU_BUDGET_S must be a whole number of seconds, got '$BUDGET'" >&2
    exit 2
    ;;
esac
mkdir -p "$OUT"
START=$SECONDS
printf 'step\trc\tseconds\tlimit\n' > "$OUT/steps.tsv"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    > "$OUT/install.txt" 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/kernels"
export WANDB_MODE=offline TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
unset TRITON_INTERPRET

# step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is short)
step() {
  local name=$1 want=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((want < left ? want : left))
  if ((limit < 20)); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT/steps.tsv"
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >> "$OUT/steps.tsv"
}

# the deepspeed launcher, one GPU (the module form: no `deepspeed` script on the device)
LAUNCH=(python3 -m deepspeed.launcher.runner --num_gpus 1)
if [ -n "$DRY" ]; then
  KSIZE=--quick STEP_PRESET=cpu DEC_PRESET=decoder-cpu MAIN_STEPS=2 NSTEPS=1 PREC=bf16
  SMALL=(--batch 4 --seq 16) MEM_PRESET=decoder-cpu MEM_SMALL=(--batch 2 --seq 16)
else
  KSIZE="" STEP_PRESET=bert-base DEC_PRESET=decoder-1b MAIN_STEPS=30 NSTEPS=20 PREC=bf16
  SMALL=() MEM_PRESET=decoder-peft MEM_SMALL=()
fi

{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
  git log -1 --format='%h %cs'; } > "$OUT/gpu.txt" 2>&1
python3 -m pip list > "$OUT/pip_list.txt" 2>&1
# needs NAME: skip the steps that import `datasets` where it is missing
needs_datasets() {
  python3 -c "import datasets" 2> /dev/null && return 0
  printf '%s\tskipped (no datasets)\t0\t0\n' "$1" >> "$OUT/steps.tsv"
  return 1
}
step kernels_gpu_tests 120 python3 -m pytest -q -m gpu tests/kernel_ops
step bench_kernels 180 python3 launch/bench_kernels.py $KSIZE --out "$OUT/kernels.csv"
step bench_step 120 python3 launch/bench_step.py --preset "$STEP_PRESET" --steps "$NSTEPS" \
  "${SMALL[@]}" --csv "$OUT/step.csv"
needs_datasets influence_precision && step influence_precision 60 \
  python3 launch/influence_precision.py
needs_datasets train_main && step train_main 90 "${LAUNCH[@]}" launch/train.py \
  --ds_config ds_configs/zero2.json --train.precision="$PREC" --train.max_steps="$MAIN_STEPS" \
  --train.eval_every=0 --output.dir="$OUT/run_main"
needs_datasets train_zero3_teacher && step train_zero3_teacher 90 "${LAUNCH[@]}" launch/train.py \
  --ds_config ds_configs/zero2.json --deepspeed.teacher.zero_optimization.stage=3 \
  --train.precision="$PREC" --train.max_steps="$MAIN_STEPS" --train.eval_every=0 \
  --output.dir="$OUT/run_z3"
step bench_step_decoder 240 python3 launch/bench_step.py --preset "$DEC_PRESET" \
  --precision "$PREC" --methods online_kd,lgtm --steps 6 --warmup 2 --csv "$OUT/step.csv"
needs_datasets train_onpolicy_lora && step train_onpolicy_lora 90 "${LAUNCH[@]}" \
  launch/train.py --config configs/examples/causal_lm_tiny.yaml --ds_config ds_configs/zero3.json \
  --train.precision="$PREC" --train.max_steps="$MAIN_STEPS" --train.eval_every=0 \
  --method.lmbda=0.5 --method.generation.max_new_tokens=16 --data.max_length=48 \
  --model.teacher_peft.enabled=true --output.dir="$OUT/run_onpolicy_lora"
step bench_memory_peft 120 python3 launch/bench_memory.py --preset "$MEM_PRESET" \
  --precision "$PREC" --steps 3 --warmup 1 "${MEM_SMALL[@]}" --csv "$OUT/memory.csv"
rm -rf "$OUT"/run_*/student "$OUT"/run_*/teacher  # model weights: not needed back
cat "$OUT/steps.tsv"
tail -n 15 "$OUT"/*.txt

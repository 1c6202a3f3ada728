#!/usr/bin/env bash
# The prepared GPU check: every GPU figure the project reports, on one GPU, in about 5 minutes.
# Needs only the README's set-up (.venv) and the TonguExpert photos in ../shared (no downloads: the
# pretrained run uses the efficientnet-lite0 weights package). Each step has its own time limit and
# the script goes on when one fails; figures go to bench/results/gpu/ and a summary to stdout.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --quick    # tiny settings on the CPU: checks the script itself (CI-sized)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${GPU_CHECK_OUT:-bench/results/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

if [ "${1:-}" = "--quick" ]; then
  DEV=cpu; PREC=fp32; SIZE=64; BATCH=8; STEPS=2; WARM=1; REPEATS=1; LIMIT=300; RATIO_BACKBONE=test_convnext
  BACKBONES="test_convnext test_vit"; RUN_ARGS="--set image_size=64 --set batch_size=8 --set max_steps_per_epoch=2"
else
  DEV=cuda; PREC=bf16; SIZE=224; BATCH=64; STEPS=20; WARM=5; REPEATS=3; LIMIT=600; RATIO_BACKBONE=convnext_base
  BACKBONES="convnext_tiny convnext_small convnext_base convnext_large swin_tiny swin_small swin_base swin_large vit_base vit_large"
  RUN_ARGS="--set image_size=224 --set batch_size=64 --set max_steps_per_epoch=20"
fi

step() { echo; echo "== $1"; }
run() {  # run LIMIT_SECONDS NAME COMMAND...: time-limited, output kept in $OUT/NAME.log, never stops the script
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (log $OUT/$name.log)"
  tail -n 4 "$OUT/$name.log"
  return 0
}

step "machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

step "train / eval ratios: $RATIO_BACKBONE, $SIZE px, batch $BATCH, $PREC, channels_last (targets >= 0.95; data path alone >= 10,000/s), with the profile by loop scope"
run "$LIMIT" "throughput-$RATIO_BACKBONE" $PY bench/throughput.py --backbone "$RATIO_BACKBONE" --image-size "$SIZE" \
  --batch-size "$BATCH" --device "$DEV" --precision "$PREC" --channels-last --steps "$STEPS" --warmup "$WARM" \
  --repeats "$REPEATS" --profile "$STEPS" --out "$OUT/throughput-$RATIO_BACKBONE.json"

step "every backbone: model-only samples/s and peak memory at its recipe batch and at batch 64"
run "$LIMIT" backbones $PY bench/backbone_speed.py --device "$DEV" --image-size "$SIZE" --precision "$PREC" \
  --steps "$STEPS" --large-batch "$BATCH" --out "$OUT/backbones.json" $BACKBONES

step "a real two-stage run: tf_efficientnet_lite0 from its packaged weights on TonguExpert"
DATA=$($PY -c "import sys; sys.path.insert(0, 'bench'); import common; print(common.ensure_import(common.DEFAULT_DB, 'predicted'))" 2>/dev/null | tail -n 1)
if [ -d "$DATA" ]; then
  rm -rf "$OUT/run-lite0"
  run "$LIMIT" run-lite0 .venv/bin/tongue-nb train --data "$DATA" --backbone tf_efficientnet_lite0 --out "$OUT/run-lite0" \
    --set device="$DEV" --set precision="$PREC" --set channels_last=true --set stage1_epochs=1 --set stage2_epochs=3 \
    --set crop=crop_blank --set progress=false $RUN_ARGS
  $PY -c "import json; s=json.load(open('$OUT/run-lite0/summary.json')); print('test combined', round(s['final_metrics_fixed']['combined_score'], 4), 'train samples/s', round(s['train_samples_per_s'] or 0, 1), 'weights', s['pretrained'].get('kind'))" 2>/dev/null || true
else
  echo "TonguExpert not found: skipped"
fi

if [ "$DEV" = cuda ]; then
  step "torchrun (1 process) with torch.compile"
  rm -rf "$OUT/run-compile"
  run "$LIMIT" run-compile .venv/bin/torchrun --nproc_per_node 1 -m tongue_nb train --data "$DATA" \
    --backbone tf_efficientnet_lite0 --out "$OUT/run-compile" --set compile=true --set stage1_epochs=0 \
    --set stage2_epochs=1 --set progress=false $RUN_ARGS

  step "out of memory: the retry with half batches (memory capped at 3% of the card)"
  rm -rf "$OUT/run-oom"
  run "$LIMIT" run-oom $PY -c "
import torch; torch.cuda.set_per_process_memory_fraction(0.03)
from tongue_nb.pipeline.cli import main
raise SystemExit(main(['train', '--data', '$DATA', '--backbone', 'convnext_base', '--out', '$OUT/run-oom',
  '--set', 'pretrained=false', '--set', 'batch_size=256', '--set', 'stage1_epochs=0', '--set', 'stage2_epochs=1',
  '--set', 'max_steps_per_epoch=4', '--set', 'image_size=224', '--set', 'progress=false']))"
  grep -h "out of memory" "$OUT/run-oom.log" | head -n 3
fi

step "done: figures in $OUT"
ls "$OUT"

#!/usr/bin/env bash
# The README's ablation tables (issue 21): HOPE's components on/off at `tiny` and `small`, each
# variant a train.py run OUT/ablation-SIZE/NAME-SEED, then `evaluate ablation` per size.
# "hope" is HOPE at CMS periods (1, 4, 16) — the configuration every variant changes one thing
# of; "hope-cms124" is the default since issue 21. Finished runs are skipped, so the script
# resumes where it stopped. Two runs at a time, one thread each (a 2-core machine): about
# 2.5 hours for everything at tiny, 3 at small. Usage:
#   examples/hope/ablation.sh [OUT] [SIZE ...]          (default: runs tiny small)
# DRY_RUN=1 prints each run's train.py arguments, one run per line, and runs nothing
# (queue.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs}; shift $(( $# > 0 ? 1 : 0 ))
SIZES=${*:-tiny small}
OLD='"cms_periods=(1,4,16)"'

source examples/hope/queue.sh

variants() {  # the runs of one size, one per line: NAME ARCH SEED [options...]
  local size=$1 seeds=$2 screen=$3
  for seed in $seeds; do
    echo "hope hope $seed --model-option $OLD"
    echo "hope-cms124 hope $seed --model-option \"cms_periods=(1,2,4)\""
    echo "hope-cms111 hope $seed --model-option \"cms_periods=(1,1,1)\""
    echo "titans titans $seed"
  done
  for seed in $screen; do  # one component each, against "hope" (or two, named)
    echo "hope-static-k hope $seed --model-option $OLD --model-option \"static_parts=('k',)\""
    echo "hope-static-v hope $seed --model-option $OLD --model-option \"static_parts=('v',)\""
    echo "hope-static-kv hope $seed --model-option $OLD --model-option \"static_parts=('k','v')\""
    echo "hope-static-gates hope $seed --model-option $OLD --model-option \"static_parts=('eta','alpha')\""
    echo "hope-static-values hope $seed --model-option $OLD --model-option \"static_parts=('values',)\""
    echo "hope-innerlr2x hope $seed --model-option $OLD --model-option inner_lr_scale=0.125"
    echo "hope-clip1e6 hope $seed --model-option $OLD --model-option inner_grad_clip=1e6"
    echo "hope-expansion1 hope $seed --model-option $OLD --model-option memory_expansion=1"
    echo "hope-depth1 hope $seed --model-option $OLD --model-option memory_depth=1"
    echo "hope-cmslr1 hope $seed --model-option $OLD --cms-lr-power 1"
    echo "hope-cms111-static-kv hope $seed --model-option \"cms_periods=(1,1,1)\" --model-option \"static_parts=('k','v')\""
    echo "hope-muon3e-3 hope $seed --model-option $OLD --optim Muon --lr 3e-3"
    echo "hope-muon hope $seed --model-option $OLD --optim Muon --lr 1e-2"
    echo "hope-muon3e-2 hope $seed --model-option $OLD --optim Muon --lr 3e-2"
    echo "hope-muon1e-1 hope $seed --model-option $OLD --optim Muon --lr 1e-1"
    echo "titans-muon titans $seed --optim Muon --lr 1e-2"
  done
}

for size in $SIZES; do
  mkdir -p "$OUT/ablation-$size"
  if [ "$size" = tiny ]; then seeds="0 1 2" screen="0 1 2"
  else seeds="0 1" screen=""; fi
  variants "$size" "$seeds" "$screen" | while read -r name arch seed opts; do
    echo "$OUT/ablation-$size/$name-$seed --arch $arch --size $size --seed $seed $opts"
  done | queues
  [ -n "${DRY_RUN:-}" ] || python -m examples.hope.evaluate ablation "$OUT/ablation-$size" \
    --reference hope
done

#!/usr/bin/env bash
# The results table of examples/hope/README.md (its ablation tables: ablation.sh): train the
# three models at the tiny size on two seeds,
# evaluate test-time learning on each run, train/test associative recall, print the table.
# About 45 minutes on 2 CPU cores. Usage: examples/hope/reproduce.sh [OUT] [SIZE] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/tiny}; SIZE=${2:-tiny}; shift $(( $# > 2 ? 2 : $# )) || true
SEEDS=${*:-0 1}
for seed in $SEEDS; do
  for arch in hope titans transformer; do
    python -m examples.hope.train --arch "$arch" --size "$SIZE" --seed "$seed" \
      --out "$OUT/$arch-$seed" --resume --quiet
  done
done
for seed in $SEEDS; do
  for arch in hope titans transformer; do
    python -m examples.hope.evaluate ttt "$OUT/$arch-$seed"
  done
done
for arch in hope titans transformer; do
  for seed in $SEEDS; do
    python -m examples.hope.evaluate recall --arch "$arch" --seed "$seed" --out "$OUT/recall-$arch-$seed"
  done
done
python -m examples.hope.evaluate table "$OUT"

#!/usr/bin/env bash
# The HOPE README's "Adaptive CMS periods" records (issue 19), at `tiny` in OUT/auto-tiny/:
#   hope-auto-SEED          every CMS level at update_period="auto" (κ = 1, max 64), 3 seeds
#   hope-auto-max16-0, hope-auto-k0.25-0      the criterion's two knobs, one seed each
#   hope-fixedAxBxC-SEED    every level fixed: (1,1,1), (4,4,4), (16,16,16), (64,64,64), 3 seeds
#   hope-fixed1x1x4-0 …     one level at a time slowed to 4, 16 or 64 from (1, 1, 1), one seed:
#                           the search for the best fixed period per level, whose best on seed 0
#                           then runs on seeds 1 and 2 too
# ((1, 1, 1) is the ablation's hope-cms111: the same arguments; (1, 2, 4) and (1, 4, 16) are its
# hope-cms124 and hope.) Then the test-time-learning stream of each auto-trained model
# (`evaluate ttt --fixed 4 16 64`, skipped where its ttt.json exists) and `evaluate ablation`
# against hope-auto. Finished runs are skipped (queue.sh). About 2 h for the auto and fixed
# runs, 1 h for the screen, on the two cores. Usage: examples/hope/periods.sh [OUT]  (default: runs)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs}/auto-tiny

source examples/hope/queue.sh

periods() { echo "--model-option \"cms_periods=($1,$2,$3)\""; }

runs() {  # one run per line: OUT [train.py options...]
  local tiny="--arch hope --size tiny"
  for seed in 0 1 2; do
    echo "$OUT/hope-auto-$seed $tiny --seed $seed --auto-periods"
  done
  echo "$OUT/hope-auto-max16-0 $tiny --seed 0 --auto-periods --auto-max-period 16"
  echo "$OUT/hope-auto-k0.25-0 $tiny --seed 0 --auto-periods --auto-significance 0.25"
  for seed in 0 1 2; do
    for c in 1 4 16 64; do
      echo "$OUT/hope-fixed${c}x${c}x${c}-$seed $tiny --seed $seed $(periods $c $c $c)"
    done
  done
  for c in 4 16 64; do
    echo "$OUT/hope-fixed${c}x1x1-0 $tiny --seed 0 $(periods $c 1 1)"
    echo "$OUT/hope-fixed1x${c}x1-0 $tiny --seed 0 $(periods 1 $c 1)"
    echo "$OUT/hope-fixed1x1x${c}-0 $tiny --seed 0 $(periods 1 1 $c)"
  done
}

best() {  # the fixed schedule with the best seed-0 val bits/byte among the finished runs
  python - "$OUT" <<'PY'
import glob, json, os, sys
scores = {}
for path in glob.glob(os.path.join(sys.argv[1], "hope-fixed*-0", "metrics.json")):
    value = json.load(open(path)).get("final_val_bits_per_byte")
    if value is not None:
        scores[os.path.basename(os.path.dirname(path))[:-2]] = value
print(min(scores, key=scores.get) if scores else "")
PY
}

mkdir -p "$OUT"
runs | queues
# (a dry run shows this stage with one of the screen's rows)
if [ -n "${DRY_RUN:-}" ]; then choice=hope-fixed1x1x4; else choice=$(best); fi
for seed in 1 2; do  # the best fixed choice per level, on every seed (skipped where it ran)
  [ -z "$choice" ] || echo "$OUT/$choice-$seed --arch hope --size tiny --seed $seed" \
    "$(periods $(echo "${choice#hope-fixed}" | tr x ' '))"
done | queues
[ -z "${DRY_RUN:-}" ] || exit 0
for seed in 0 1 2; do
  run_dir="$OUT/hope-auto-$seed"
  [ -f "$run_dir/ttt.json" ] || OMP_NUM_THREADS=2 python -m examples.hope.evaluate ttt "$run_dir" \
    --fixed 4 16 64
done
python -m examples.hope.evaluate ablation "$OUT" --reference hope-auto

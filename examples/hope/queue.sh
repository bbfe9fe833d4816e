# Sourced by ablation.sh and periods.sh: train.py runs, each skipped once it has finished, two at
# a time on one thread each (a 2-core machine). DRY_RUN=1 prints each run's train.py arguments,
# one run per line, and runs nothing.

run() {  # run OUT [train.py options...]: one run into OUT, resumed where it stopped
  local out=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@" --out "$out"; printf '\n'
    return 0
  fi
  if python -c "import json,sys; m=json.load(open('$out/metrics.json')); \
sys.exit(0 if m.get('final_val_bits_per_byte') is not None else 1)" 2>/dev/null; then
    return 0
  fi
  mkdir -p "$(dirname "$out")"
  OMP_NUM_THREADS=1 python -m examples.hope.train "$@" --out "$out" --resume --quiet \
    > "$out.log" 2>&1 || echo "FAILED: $out (see $out.log)"
}

queues() {  # lines "OUT [options...]" on stdin, shell-quoted: two queues, the lines alternating
  local lines; lines=$(cat)
  # A dry run lists the queues one after the other: two printing at once would interleave.
  for parity in 1 0; do
    printf '%s\n' "$lines" | awk -v p=$parity 'NF && NR % 2 == p' |
      while read -r out opts; do eval "run $out $opts"; done &
    [ -z "${DRY_RUN:-}" ] || wait
  done
  wait
}

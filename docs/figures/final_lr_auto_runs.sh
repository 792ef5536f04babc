#!/usr/bin/env bash
# The runs behind final-lr-auto-results.md: final_lr="auto" against the grid
# final_lr in {0.01, 0.03, 0.1, 0.3, 1, 3, 10} with AdaBound, one `dynabound run` per value
# and seed, one at a time, one CPU thread each. Finished runs are skipped and interrupted ones
# resumed, so rerunning the script continues where it stopped.
#
#   bash docs/figures/final_lr_auto_runs.sh OUT TASK...   (TASK: digits convex mnist ptb)
#   VALUES=auto bash docs/figures/final_lr_auto_runs.sh OUT TASK...   (a subset of the values)
#
# MNIST and PTB need the real files: DATA (default ../shared/data) holds mnist/ and ptb/.
set -uo pipefail
out="${1:?usage: final_lr_auto_runs.sh OUT TASK...}"
shift
data="${DATA:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}"
values="${VALUES:-auto 0.01 0.03 0.1 0.3 1 3 10}"

finished() {  # a run directory whose metrics reach its last epoch
  python - "$1" "$2" <<'P'
import json, pathlib, sys
path = pathlib.Path(sys.argv[1]) / "metrics.jsonl"
epochs = int(sys.argv[2])
done = path.is_file() and any(
    json.loads(line).get("epoch") == epochs for line in path.read_text().splitlines() if line
)
sys.exit(0 if done else 1)
P
}

run() {  # run DIR EPOCHS ARGS...: one run, resumed if it was interrupted
  local dir="$1" epochs="$2"
  shift 2
  finished "$dir" "$epochs" && return 0
  local resume=()
  [ -f "$dir/config.json" ] && resume=(--resume)
  echo "$(date -u +%FT%T) $dir"
  mkdir -p "$(dirname "$dir")"
  dynabound run "$@" --epochs "$epochs" --out "$dir" --threads 1 --quiet "${resume[@]}" \
    > "$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"
}

for task in "$@"; do
  case "$task" in
    digits)
      for seed in 1 2 3; do
        for v in $values; do
          run "$out/digits/final_lr=$v/seed-$seed" 30 digits --optim adabound --final-lr "$v" \
            --seed "$seed"
        done
      done ;;
    convex)
      # The convex presets use the paper's bounds, for which "auto" is refused (their rate
      # falls as 1/sqrt(t)); here the authors' reference bounds, on every problem.
      for problem in theorem synthetic section3; do
        for v in $values; do
          run "$out/convex-$problem/final_lr=$v/seed-0" 5 convex --problem "$problem" \
            --optim adabound --bounds reference --final-lr "$v"
        done
      done ;;
    mnist)
      for seed in 1 2 3; do
        for v in $values; do
          run "$out/mnist/final_lr=$v/seed-$seed" 100 mnist --optim adabound --final-lr "$v" \
            --seed "$seed" --data-dir "$data/mnist"
        done
      done ;;
    ptb)
      for seed in 1 2; do
        for v in $values; do
          run "$out/ptb/final_lr=$v/seed-$seed" 2 ptb --optim adabound --final-lr "$v" --layers 1 \
            --seed "$seed" --data-dir "$data/ptb"
        done
      done ;;
    *) echo "unknown task $task (digits convex mnist ptb)" >&2; exit 2 ;;
  esac
done

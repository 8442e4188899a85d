#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: the full SLN (ResNet-101 FPN + GLM) at
# 1024x1024, each run beside torchvision's Mask R-CNN R101-FPN (--peer), in
# one process (scripts/benchmark.py --runs: one jax and torch start-up, the
# variables built once), one JSON line per run in ${OUT:-.}/gpu_benchmarks.jsonl.
#
#   bash scripts/gpu_benchmarks.sh                      # the runs below, most wanted first
#   bash scripts/gpu_benchmarks.sh infer:bfloat16:1 train:bfloat16:2
#   PROFILE=1 bash scripts/gpu_benchmarks.sh train:bfloat16:2
#
# Each argument is MODE:DTYPE:BATCH. Sized for a short device lease: no run
# starts after BUDGET_S seconds (default 400; the runs left get a 'skipped'
# row) and TIMEOUT_S (default 560) ends the whole sweep, so it fits one
# 10-minute device command; a run that fails (out of memory) gets a row
# with its error and the next one starts. Every run the sweep did not reach
# (killed by TIMEOUT_S, or the command refused) also gets a row that says why.
# ${OUT}/gpu_benchmarks.md has the rows as a markdown table.
# PROFILE=1 also traces each run (jax.profiler) and writes the text summary
# of scripts/profile_summary.py to ${OUT}/profile_MODE_DTYPE_BATCH.txt.
# CONFIG and IMAGE_SIZE (0: the config's) change the model (a CPU dry run:
# CONFIG=configs/tiny.py bash scripts/gpu_benchmarks.sh infer:float32:1).
#
# Needs jax[cuda], flax, optax, orbax, absl, ml_collections (+ torch and
# torchvision for the peer); no TensorFlow. The device machines here lack
# ml_collections: fetch its wheel into .whl/ (device README) and start the
# command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
set -u
# The device machines run the repository without `pip install -e .`: its
# packages (sln_jax, input_pipeline, configs, and scripts/ as sln_scripts)
# are put on the path instead.
root=$(cd "$(dirname "$0")/.." && pwd)
links=$(mktemp -d)
ln -s "$root/scripts" "$links/sln_scripts"
export PYTHONPATH="$root:$links${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-.}"
mkdir -p "$OUT"
out="$OUT/gpu_benchmarks.jsonl"
CONFIG="${CONFIG:-configs/default.py}"
IMAGE_SIZE="${IMAGE_SIZE:-0}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  # The targets first: inference latency at batch 1, training throughput
  # against the peer; then the other dtype and batches.
  runs=(infer:bfloat16:1 train:bfloat16:2 train:bfloat16:8 infer:float32:1 train:float32:2
        infer:bfloat16:8 train:bfloat16:1 infer:bfloat16:2 train:float32:1 infer:float32:8)
fi
extra=()
profiles="/tmp/gpu_benchmarks_profiles"
if [ "${PROFILE:-0}" = 1 ]; then
  rm -rf "$profiles"
  extra=(--profile_dir="$profiles")
fi
log="/tmp/gpu_benchmarks.log"
before=0
[ -f "$out" ] && before=$(wc -l < "$out")
exec 3>&1
timeout --kill-after=10 "${TIMEOUT_S:-560}" python3 scripts/benchmark.py --config="$CONFIG" \
    --image_size="$IMAGE_SIZE" --runs="$(IFS=,; echo "${runs[*]}")" --steps=10 --peer \
    --budget_s="${BUDGET_S:-400}" --output="$out" "${extra[@]}" 2>&1 1>&3 | tee "$log" >&2
rc=${PIPESTATUS[0]}
# One row for every run without one: the exit status and the log's last error line.
python3 - "$rc" "$log" "$out" "$before" "$CONFIG" "${runs[@]}" <<'PY'
import collections, json, sys
rc, log, out, before, config, *runs = sys.argv[1:]
done = collections.Counter()
try:
  with open(out) as f:
    for line in list(f)[int(before):]:
      r = json.loads(line)
      done[(r.get('mode'), r.get('dtype'), str(r.get('batch')))] += 1
except FileNotFoundError:
  pass
lines = [l.strip() for l in open(log, errors='replace') if l.strip()]
errors = [l for l in lines if 'error' in l.lower() or 'exhausted' in l.lower()]
why = 'over TIMEOUT_S' if rc in ('124', '137') else (errors or lines or [''])[-1][:300]
with open(out, 'a') as f:
  for spec in runs:
    key = tuple((spec.split(':') + ['', '', ''])[:3])
    if done[key]:
      done[key] -= 1
      continue
    mode, dtype, batch = key
    f.write(json.dumps(dict(mode=mode, dtype=dtype, batch=int(batch) if batch.isdigit() else batch,
                            config=config, error=f'exit {rc}: {why}')) + '\n')
PY
if [ "${PROFILE:-0}" = 1 ]; then
  for dir in "$profiles"/*/; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    python3 scripts/profile_summary.py "$dir" --top 30 > "$OUT/profile_${name}.txt" 2>&1
  done
fi
cat "$out"
# The same rows as a markdown table (docs/benchmarks.md's columns).
python3 scripts/benchmark_table.py "$out" | tee "$OUT/gpu_benchmarks.md"

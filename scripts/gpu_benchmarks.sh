#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: the full SLN (ResNet-101 FPN + GLM) at
# 1024x1024, each run beside torchvision's Mask R-CNN R101-FPN (--peer, its
# own process), one JSON line per run in ${OUT:-.}/gpu_benchmarks.jsonl.
#
#   bash scripts/gpu_benchmarks.sh                      # every row (~20-30 min)
#   bash scripts/gpu_benchmarks.sh infer:bfloat16:1 train:bfloat16:2
#   PROFILE=1 bash scripts/gpu_benchmarks.sh train:bfloat16:2
#
# Each argument is MODE:DTYPE:BATCH. PROFILE=1 also traces each run
# (jax.profiler) and writes the text summary of scripts/profile_summary.py
# to ${OUT}/profile_MODE_DTYPE_BATCH.txt. RUN_TIMEOUT (s, default 420) caps
# one run, so a hang or an out-of-memory batch costs one row, not the rest.
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
OUT="${OUT:-.}"
mkdir -p "$OUT"
out="$OUT/gpu_benchmarks.jsonl"
CONFIG="${CONFIG:-configs/default.py}"
IMAGE_SIZE="${IMAGE_SIZE:-0}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec 3>&1
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(infer:bfloat16:1 infer:bfloat16:2 infer:bfloat16:8 infer:float32:1 infer:float32:8
        train:bfloat16:1 train:bfloat16:2 train:bfloat16:8 train:float32:1 train:float32:2)
fi
for spec in "${runs[@]}"; do
  IFS=: read -r mode dtype batch <<<"$spec"
  extra=()
  if [ "${PROFILE:-0}" = 1 ]; then
    extra=(--profile_dir="/tmp/profile_${mode}_${dtype}_${batch}")
  fi
  echo "== $spec" >&2
  log="/tmp/gpu_benchmarks_${mode}_${dtype}_${batch}.log"
  timeout "${RUN_TIMEOUT:-420}" python3 scripts/benchmark.py --config="$CONFIG" --image_size="$IMAGE_SIZE" \
      --mode="$mode" --dtype="$dtype" --batch="$batch" --steps=10 --peer \
      --output="$out" "${extra[@]}" 2>&1 1>&3 | tee "$log" >&2   # stderr also to $log
  rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ]; then
    # One JSON line for the failed row: the exit status and stderr's last error line.
    python3 - "$mode" "$dtype" "$batch" "$CONFIG" "$rc" "$log" >> "$out" <<'PY'
import json, sys
mode, dtype, batch, config, rc, log = sys.argv[1:]
lines = [l.strip() for l in open(log, errors='replace') if l.strip()]
errors = [l for l in lines if 'error' in l.lower() or 'exhausted' in l.lower()]
why = 'over RUN_TIMEOUT' if rc in ('124', '137') else (errors or lines or [''])[-1][:300]
print(json.dumps(dict(mode=mode, dtype=dtype, batch=int(batch), config=config,
                      error=f'exit {rc}: {why}')))
PY
  fi
  if [ "${PROFILE:-0}" = 1 ] && [ -d "/tmp/profile_${mode}_${dtype}_${batch}" ]; then
    python3 scripts/profile_summary.py "/tmp/profile_${mode}_${dtype}_${batch}" --top 30 \
      > "$OUT/profile_${mode}_${dtype}_${batch}.txt" 2>&1
  fi
done
cat "$out"

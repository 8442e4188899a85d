#!/usr/bin/env bash
# Produces the GPU rows of docs/benchmarks.md on one NVIDIA GPU (H100/H200):
# full SLN (ResNet-101 FPN + GLM) at 1024x1024, train and infer, fp32 and
# bf16, batch 1, 2 and 8 where memory allows, each beside torchvision's
# Mask R-CNN R101-FPN (--peer). Needs jax[cuda], flax, optax, orbax,
# ml_collections and absl (no TensorFlow). Output: one JSON line per row in
# ${OUT:-.}/gpu_benchmarks.jsonl.
set -u
out="${OUT:-.}/gpu_benchmarks.jsonl"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
for mode in infer train; do
  for dtype in bfloat16 float32; do
    for batch in 1 2 8; do
      python3 scripts/benchmark.py --config=configs/default.py --mode=$mode \
        --dtype=$dtype --batch=$batch --steps=20 --peer --output="$out" \
        || echo "{\"mode\": \"$mode\", \"dtype\": \"$dtype\", \"batch\": $batch, \"error\": \"failed (out of memory?)\"}" >> "$out"
    done
  done
done
cat "$out"

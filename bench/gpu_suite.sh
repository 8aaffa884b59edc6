#!/usr/bin/env bash
# The GPU benchmark suite in one go (training step and conditional sampling), results as JSON in $1.
# Needs only torch, tqdm and monai: no Ray.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 bench/sampling.py --model VolDiT-L/4 --roi 512 512 256 --batch 8 --out "$out/sampling_l4.json"
python3 bench/train_step.py --models VolDiT-L/4 VolDiT-B/4 VolDiT-S/4 VolDiT-XS/4 --modes baseline bf16_sdpa \
  --out "$out/train_p4.json"
python3 bench/train_step.py --models VolDiT-L/2 VolDiT-B/2 VolDiT-S/2 VolDiT-XS/2 --modes baseline bf16_sdpa \
  --iters 5 --out "$out/train_p2.json"
python3 bench/train_step.py --models VolDiT-L/4 --batch 8 --modes bf16_sdpa bf16_sdpa_compile \
  --out "$out/train_l4_b8.json"
python3 bench/synthesis.py --size full --model VolDiT-L/4 --masks 16 --baseline-masks 2 --batch 8 --out "$out/synthesis_l4.json"  # needs nibabel (carry its wheel)

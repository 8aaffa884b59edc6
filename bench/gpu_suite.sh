#!/usr/bin/env bash
# The GPU benchmark suite in one go, results as JSON in $1. Needs torch, tqdm, safetensors, monai,
# omegaconf and nibabel, not Ray (the README's Benchmarks section says how to bring them as wheels).
# About 12 minutes on one H200.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Fast paths against their plain counterparts (tolerances), SDPA kernels, CUDA graphs of the sampling loop.
python3 bench/fastpaths.py --out "$out/fastpaths.json"
# Training step: the reference procedure beside the fast paths, at the seed's batch and at larger ones.
python3 bench/train_step.py --models VolDiT-L/4 --batch 2 --modes baseline bf16_sdpa bf16_cudnn_compile_blocks_aten_rng \
  --out "$out/train_l4_b2.json"
# The largest batch that fits: 32 in the H200's 141 GB, 24 in an H100's 80 GB.
big=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{print ($1 > 100000) ? 32 : 24}')
python3 bench/train_step.py --models VolDiT-L/4 --batch 8 "$big" \
  --modes bf16_cudnn bf16_cudnn_compile_blocks bf16_cudnn_compile_blocks_aten_rng bf16_cudnn_compile_blocks_nodrop \
  --profile "$out/profile.txt" --out "$out/train_l4.json"
python3 bench/train_step.py --models VolDiT-B/4 VolDiT-S/4 VolDiT-XS/4 --modes baseline bf16_sdpa \
  --out "$out/train_p4.json"
python3 bench/train_step.py --models VolDiT-L/2 VolDiT-B/2 VolDiT-S/2 VolDiT-XS/2 --modes baseline bf16_sdpa \
  --iters 5 --out "$out/train_p2.json"
# Denoising only, and the whole synthesis job (masks in, NIfTI out) against the reference loop.
python3 bench/sampling.py --model VolDiT-L/4 --roi 512 512 256 --batch 8 --out "$out/sampling_l4.json"
python3 bench/synthesis.py --size full --model VolDiT-L/4 --masks 8 --baseline-masks 1 --batch 8 \
  --out "$out/synthesis_l4.json"
python3 bench/vqgan_memory.py --roi 512 512 256 --out "$out/vqgan_memory.json"

#!/usr/bin/env bash
# The GPU benchmark suite in one go, results as JSON in $1. Needs torch, tqdm, safetensors, monai,
# omegaconf and nibabel, not Ray (the README's Benchmarks section says how to bring them as wheels).
# "baseline" is the authors' procedure (fp16, their memory-efficient attention kernel, no attention-weight
# dropout); "baseline_math" the old math-attention baseline, run once per script for the comparison.
# About 12 minutes on one H200 with the old baseline; the faithful baseline's rows are not yet timed.
set -u
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Fast paths against their plain counterparts (tolerances), SDPA kernels, CUDA graphs of the sampling loop.
python3 bench/fastpaths.py --out "$out/fastpaths.json"
# Training step at the seed's batch: the authors' procedure, the old math baseline, the fast paths.
python3 bench/train_step.py --models VolDiT-L/4 --batch 2 \
  --modes baseline baseline_math bf16_sdpa bf16_cudnn_compile_blocks_aten_rng --out "$out/train_l4_b2.json"
# Larger batches, each beside the baseline at the same batch: 32 in the H200's 141 GB, 24 in an H100's 80 GB.
big=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | awk '{print ($1 > 100000) ? 32 : 24}')
python3 bench/train_step.py --models VolDiT-L/4 --batch 8 "$big" \
  --modes baseline bf16_cudnn bf16_cudnn_compile_blocks bf16_cudnn_compile_blocks_aten_rng \
  bf16_cudnn_compile_blocks_nodrop --profile "$out/profile.txt" --out "$out/train_l4.json"
# The platform's own loop (`fit`, its defaults: bf16, fused AdamW, compiled blocks) against the best
# micro-benchmark mode at the same batch: the goal is a ratio >= 0.9.
python3 bench/stage_step.py configs/transformer/dit_ds8_l4.yaml --batch 8 --steps 30 \
  --against "$out/train_l4.json" --out "$out/stage_l4_b8.json"
python3 bench/train_step.py --models VolDiT-B/4 VolDiT-S/4 VolDiT-XS/4 --modes baseline bf16_sdpa \
  --out "$out/train_p4.json"
python3 bench/train_step.py --models VolDiT-L/2 VolDiT-B/2 VolDiT-S/2 VolDiT-XS/2 --modes baseline bf16_sdpa \
  --iters 5 --out "$out/train_p2.json"
# Denoising only (baseline, baseline_math, fast path at batch 1 and 8), and the whole synthesis job
# (gzipped 512x512xN masks in, NIfTI out) against the authors' loop over 4 masks.
python3 bench/sampling.py --model VolDiT-L/4 --roi 512 512 256 --batch 8 --out "$out/sampling_l4.json"
python3 bench/synthesis.py --size full --model VolDiT-L/4 --masks 8 --baseline-masks 4 --batch 8 \
  --out "$out/synthesis_l4.json"
python3 bench/vqgan_memory.py --roi 512 512 256 --out "$out/vqgan_memory.json"

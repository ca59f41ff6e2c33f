#!/usr/bin/env bash
# Latent cache for the diffusion stages, one GPU (a single process: the cache is written once, in order):
#   sbatch slurm/cache_latents.sh --vae RUNS/decoder_ft/checkpoints/last.ckpt --data SHARDS --out DIR [...]
# Arguments are those of `fvdm cache-latents`. A requeued attempt simply writes the cache again.
#SBATCH --job-name=fvdm-cache_latents
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
set -euo pipefail
source "${FVDM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
# one process whatever the allocation (pipeline.sh passes its sbatch options to every job)
srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${FVDM[@]}" cache-latents "$@"

#!/usr/bin/env bash
# Adversarial finetune:
#   sbatch slurm/adversarial.sh init_from=RUNS/consistency_phase1/checkpoints/last.ckpt data.train=...
#SBATCH --job-name=fvdm-adversarial
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
# 120 s before the time limit: checkpoint at the end of the step, requeue, resume (slurm/common.sh)
#SBATCH --signal=SIGUSR1@120
#SBATCH --requeue
set -euo pipefail
source "${FVDM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
fvdm_train "$FVDM_ROOT/experiments/adversarial.yaml" "$@"

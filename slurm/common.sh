# Sourced by every slurm/<stage>.sh; the #SBATCH lines of the stage script size the job.
#   sbatch slurm/<stage>.sh [extra.yaml ...] [key=value ...]   (from the repository root, or set FVDM_ROOT)
# FVDM_CMD: the fvdm command (default: fvdm on PATH), e.g. FVDM_CMD="$PWD/.venv/bin/python -m fvdm.cli".

FVDM_ROOT=${FVDM_ROOT:-$SLURM_SUBMIT_DIR}
read -ra FVDM <<< "${FVDM_CMD:-fvdm}"

# Rendezvous. Each task reads its rank, local rank and the world size from SLURM_* (Lightning's
# SLURMEnvironment); rank 0 listens on the allocation's first node, on a port derived from the job id, so
# jobs sharing a node do not collide and a requeued job (same id) finds the same address.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# NCCL. WARN prints only problems; NCCL_DEBUG=INFO shows the transport chosen for every peer (the first thing
# to read when multi-node training hangs or is slow). On clusters where NCCL picks the wrong interface for
# bootstrap and socket traffic, set NCCL_SOCKET_IFNAME (e.g. ib0, or ^lo,docker to exclude); with InfiniBand,
# NCCL_IB_HCA selects the adapters (e.g. mlx5) and NCCL_IB_DISABLE=1 falls back to TCP when there is no fabric.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# NVLink multicast (NVLS) stays off: on hosts whose fabric manager is not set up for it, a program using it can
# hang or take the host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# Log lines in order, as they happen (the log is appended to across requeues).
export PYTHONUNBUFFERED=1

# fvdm_train CONFIG... [ARGS...]: one `fvdm train` task per GPU on every node. devices and num_nodes come from
# the allocation (Lightning refuses values that differ from SLURM's), and --resume auto continues from the
# newest checkpoint when this is a requeued attempt (on SIGUSR1, sent 120 s before the time limit, fvdm train
# saves hpc_ckpt_<n>.ckpt in the run dir at the end of the step and requeues the job).
fvdm_train() {
  echo "fvdm: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)), $SLURM_NNODES node(s) x" \
       "$SLURM_NTASKS_PER_NODE task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
  # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05), so it is passed on
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "${FVDM[@]}" train "$@" trainer.num_nodes="$SLURM_NNODES" trainer.devices="$SLURM_NTASKS_PER_NODE" \
    --resume auto
}

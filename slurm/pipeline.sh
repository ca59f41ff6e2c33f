#!/usr/bin/env bash
# The whole chain as dependent jobs, each started only when the previous one succeeded (afterok), chained the
# way `fvdm quickstart` chains the stages:
#   vae -> decoder_ft -> cache_latents -> flow -> guidance -> cfd -> cfd_phase1 -> adversarial
#
#   slurm/pipeline.sh [--sbatch-option=value ...] data.train=SHARDS data.val=SHARDS [extra.yaml | key=value ...]
#
# Arguments starting with '-' go to every sbatch (--partition=gpu, --account=..., --nodes=4, --hold, ...; write
# them as --option=value); the others to every training stage. tracking.experiment= names the pipeline, its one
# MLflow experiment (default pipeline-<date>-<time>), and run_root= holds its runs (default runs/<experiment>).
# FVDM_PRESET=tiny adds experiments/presets/tiny-<stage>.yaml to each stage; FVDM_ARGS_<run> adds arguments to
# one step (<run>: vae, decoder_ft, cache_latents, flow, guidance, consistency, consistency_phase1,
# adversarial), e.g. the quickstart's FVDM_ARGS_cache_latents="--num-surface 2048" and
# FVDM_ARGS_consistency_phase1=optim.lr=1e-5. Logs go to ./logs/, job ids to stdout.
set -euo pipefail

export FVDM_ROOT=${FVDM_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}  # the jobs find common.sh and the configs here
mkdir -p logs  # sbatch opens logs/%x-%j.out before the job starts

sbatch_opts=() common=() experiment="" run_root="" train=""
for arg in "$@"; do
  case $arg in
    -*) sbatch_opts+=("$arg") ;;
    tracking.experiment=*) experiment=${arg#*=} ;;
    run_root=*) run_root=${arg#*=} ;;
    data.train=*) train=${arg#*=}; common+=("$arg") ;;
    *) common+=("$arg") ;;
  esac
done
if [ -z "$train" ]; then
  echo "pipeline.sh: data.train=SHARDS is required (the latent cache encodes it)" >&2
  exit 2
fi
experiment=${experiment:-pipeline-$(date +%Y%m%d-%H%M%S)}
run_root=$(realpath -m "${run_root:-runs/$experiment}")  # absolute: init_from paths outlive the cwd
common+=("tracking.experiment=$experiment" "run_root=$run_root")
latents=$run_root/latents

ckpt() { echo "$run_root/$1/checkpoints/last.ckpt"; }

prev=""
# submit SCRIPT RUN ARGS...: one job after the previous one, with FVDM_ARGS_<RUN> appended
submit() {
  local script=$1 run=$2 var=FVDM_ARGS_$2 extra dependency=()
  shift 2
  read -ra extra <<< "${!var:-}"
  if [ -n "$prev" ]; then dependency=(--dependency="afterok:$prev"); fi
  prev=$(sbatch --parsable "${dependency[@]}" "${sbatch_opts[@]}" "$FVDM_ROOT/slurm/$script" "$@" "${extra[@]}")
  prev=${prev%%;*}  # "id;cluster" on multi-cluster setups
  echo "$run $prev"
}

# stage SCRIPT RUN ARGS...: a training stage with its preset and the common arguments
stage() {
  local script=$1 run=$2 preset=()
  shift 2
  if [ -n "${FVDM_PRESET:-}" ]; then preset=("$FVDM_ROOT/experiments/presets/$FVDM_PRESET-${run%_phase1}.yaml"); fi
  submit "$script" "$run" "${preset[@]}" "${common[@]}" "$@"
}

echo "pipeline $experiment: runs in $run_root, MLflow experiment $experiment"
stage vae.sh vae
stage decoder_ft.sh decoder_ft init_from="$(ckpt vae)"
submit cache_latents.sh cache_latents --vae "$(ckpt decoder_ft)" --data "$train" --out "$latents"
stage flow.sh flow vae_from="$(ckpt decoder_ft)" latents="$latents"
stage guidance.sh guidance init_from="$(ckpt flow)" latents="$latents"
stage cfd.sh consistency init_from="$(ckpt guidance)" latents="$latents"
stage cfd_phase1.sh consistency_phase1 init_from="$(ckpt consistency)" latents="$latents"
stage adversarial.sh adversarial init_from="$(ckpt consistency_phase1)" latents="$latents"

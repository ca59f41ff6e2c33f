"""The SLURM job scripts on a real one-node cluster (munged, slurmctld and slurmd started here): a stage runs as
two srun tasks (DDP over gloo on the CPU) and stops at its step count; a job sent SIGUSR1 saves an HPC
checkpoint, requeues itself and resumes from it; the pipeline submits the chain with afterok dependencies."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fvdm.cli import main
from fvdm.models.vae import VAEConfig, VecSetVAE
from fvdm.stages.checkpoints import save_vae_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"
DAEMONS = ("slurmd", "slurmctld")  # stopped in this order
# job states (squeue(1), JOB STATE CODES) from which a job does not go on to complete without help
ENDED_EARLY = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
               "REQUEUE_HOLD", "REVOKED", "SPECIAL_EXIT", "STOPPED", "SUSPENDED", "TIMEOUT"}


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _install() -> str | None:
    """Install slurm-wlm and munge with apt-get when missing; the reason they are unavailable, or None."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm is not installed and cannot be (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]
    try:
        if _run(install, env, 600).returncode != 0:  # a stale package index: refresh it once
            _run(["apt-get", "update", "-qq"], env, 600)
            result = _run(install, env, 600)
            if result.returncode != 0:
                return f"apt-get install slurm-wlm munge failed: {result.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired as e:
        return f"apt-get timed out: {e}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose pid ``pid_file`` holds and wait for it to exit."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node cluster on this host (this host's CPUs, JobRequeue=1, no cgroups, state under a tmp dir);
    yields the environment for sbatch and friends. Skips, saying why, where slurm cannot be installed or started."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    munge = root / "munge"
    munge.mkdir(mode=0o755)  # clients need to reach the socket inside
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=fvdmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge / 'socket'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
# seconds from SIGTERM to SIGKILL when a job is requeued or cancelled
KillWait=5
# finished jobs stay visible to scontrol show job (there is no accounting database for sacct)
MinJobAge=600
# the node may claim 2 CPUs on a 1-CPU host, for the 2 tasks
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count() or 1)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in ("state", "spool"):
        (root / name).mkdir()
    # --force: munged refuses to run as root without it
    started = [_run(["munged", "--force", f"--socket={munge / 'socket'}", f"--pid-file={root / 'munged.pid'}",
                     f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}"])]
    started += [_run([daemon], env) for daemon in reversed(DAEMONS)]
    try:
        for _ in range(60):
            if _run(["sinfo", "-h", "-o", "%T"], env).stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "".join(p.stderr for p in started) + "".join(
                (root / f"{d}.log").read_text()[-1000:] for d in DAEMONS if (root / f"{d}.log").is_file())
            pytest.skip(f"the SLURM node did not come up idle: {logs}")
        yield env
    finally:
        _run(["scancel", "--full", "--user=root"], env)
        for name in (*DAEMONS, "munged"):
            _stop(root / f"{name}.pid")


@pytest.fixture(scope="module")
def guidance_ckpt(synth_data, tmp_path_factory):
    """A guidance checkpoint to start consistency distillation from: random tiny VAE, 2 flow and 2 guidance steps."""
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    vae = save_vae_checkpoint(VecSetVAE(VAEConfig(num_latents=32)), root / "vae.ckpt")
    assert main(["train", str(EXP / "flow.yaml"), *_tiny(synth_data, root, "flow"), f"vae_from={vae}",
                 "trainer.max_steps=2"]) == 0
    assert main(["train", str(EXP / "guidance.yaml"), *_tiny(synth_data, root, "guidance"), "trainer.max_steps=2",
                 f"init_from={root / 'flow' / 'checkpoints' / 'last.ckpt'}"]) == 0
    return root / "guidance" / "checkpoints" / "last.ckpt"


def _tiny(synth_data: Path, run_root: Path, stage: str) -> list[str]:
    """The tiny preset of ``stage`` plus data, sizes and no validation, as the stage tests use them."""
    return [str(EXP / "presets" / f"tiny-{stage}.yaml"), f"data.train={synth_data / 'train'}",
            f"data.val={synth_data / 'val'}", f"run_root={run_root}", "data.batch_size=2", "data.num_workers=0",
            "data.num_surface=256", "data.num_vol=256", "trainer.val_every_n_steps=1000",
            "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]


def _sbatch(env: dict[str, str], cwd: Path, script: str, *args: str, wait: bool = False) -> str:
    """Submit ``slurm/<script>`` as 2 tasks on the one CPU node; the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           *(["--wait"] if wait else []), str(ROOT / "slurm" / script), *args]
    result = _run(cmd, {**env, "FVDM_ROOT": str(ROOT), "FVDM_CMD": f"{sys.executable} -m fvdm.cli"}, 600)
    job = result.stdout.strip().split(";")[0]
    assert result.returncode == 0, f"{result.stderr}\n{_tail(cwd / 'logs' / f'fvdm-{script[:-3]}-{job}.out')}"
    return job


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", job], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _consistency_args(synth_data: Path, guidance_ckpt: Path, run_root: Path, steps: int) -> list[str]:
    return [*_tiny(synth_data, run_root, "consistency"), f"init_from={guidance_ckpt}", f"trainer.max_steps={steps}",
            "trainer.strategy=ddp", "trainer.precision=32-true", "trainer.checkpoint_every_n_steps=2"]


def _steps(run_root: Path) -> list[int]:
    """The steps of every ``train/loss`` value of the one MLflow run under ``run_root``."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.is_file() else f"{log}: not written"


def _global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)["global_step"]


@pytest.mark.slow
def test_cfd_stage_runs_on_two_tasks(slurm, synth_data, guidance_ckpt, tmp_path, monkeypatch):
    """``sbatch --wait slurm/cfd.sh``: two ranks in one process group, a fresh start, the requested 4 steps."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    run_root = tmp_path / "runs"
    job = _sbatch(slurm, tmp_path, "cfd.sh", *_consistency_args(synth_data, guidance_ckpt, run_root, 4), wait=True)
    log = (tmp_path / "logs" / f"fvdm-cfd-{job}.out").read_text()
    assert "1 node(s) x 2 task(s)" in log and "no checkpoint in" in log
    assert "All distributed processes registered. Starting with 2 processes" in log, log
    assert _global_step(run_root / "consistency" / "checkpoints" / "last.ckpt") == 4
    assert sorted(_steps(run_root)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigusr1_requeues_and_resumes(slurm, synth_data, guidance_ckpt, tmp_path, monkeypatch):
    """SIGUSR1 mid-run: an HPC checkpoint at the step it lands in, a requeue, and a second attempt that resumes
    there and ends at the requested step, every step logged exactly once in the one MLflow run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    run_root = tmp_path / "runs"
    steps = 30
    job = _sbatch(slurm, tmp_path, "cfd.sh", *_consistency_args(synth_data, guidance_ckpt, run_root, steps))
    run_dir = run_root / "consistency"
    deadline = time.time() + 300
    log = tmp_path / "logs" / f"fvdm-cfd-{job}.out"
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():  # training has made progress
        state = _job(slurm, job)
        assert time.time() < deadline and state["JobState"] not in ENDED_EARLY, (state, _tail(log))
        time.sleep(0.2)
    # what SLURM sends the job's tasks before the time limit (#SBATCH --signal=SIGUSR1@120)
    assert _run(["scancel", "--signal=USR1", job], slurm).returncode == 0
    while (state := _job(slurm, job))["JobState"] != "COMPLETED":
        # between attempts a job passes through COMPLETING, REQUEUED and PENDING, some too briefly to poll
        assert time.time() < deadline and state["JobState"] not in ENDED_EARLY, (state, _tail(log))
        if state["JobState"] == "PENDING" and state["Reason"] == "BeginTime":
            # slurmctld holds a requeued job back for two minutes; let it start now. Not within the second of
            # the requeue: slurmd refuses a launch credential dated the second the previous attempt's was revoked
            # ("Job credential revoked", and the job FAILS). A later begin time would wait for the scheduler's
            # next periodic pass (up to a minute); setting it to now schedules at once.
            time.sleep(2)
            _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], slurm)
        time.sleep(0.5)
    assert state["Restarts"] == "1" and state["ExitCode"] == "0:0", (state, _tail(log))
    log = log.read_text()
    saved = int(re.search(rf"fvdm: saved (\d+) steps; requeueing SLURM job {job}", log)[1])
    assert 0 < saved < steps and _global_step(run_dir / "hpc_ckpt_1.ckpt") == saved
    assert "attempt 2" in log
    resumed = Path(re.search(r"fvdm: resuming from (\S+)", log)[1])
    assert resumed == run_dir / "hpc_ckpt_1.ckpt" or resumed.name == "last.ckpt" and saved % 2 == 0, log
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == steps
    assert sorted(_steps(run_root)) == list(range(steps))  # no step lost or repeated across the requeue


def test_pipeline_submits_the_chain(slurm, tmp_path, monkeypatch):
    """Held jobs: the stage order, afterok on the previous job, each stage's init_from / vae_from on the previous
    run's last.ckpt, the common arguments, the preset and a per-step FVDM_ARGS_<run>."""
    monkeypatch.chdir(tmp_path)
    env = {**slurm, "FVDM_PRESET": "tiny", "FVDM_ARGS_consistency_phase1": "optim.lr=1e-5"}
    result = _run([str(ROOT / "slurm" / "pipeline.sh"), "--hold", "--gpus-per-node=0", "data.train=shards/train",
                   "data.val=shards/val", "tracking.experiment=p1", "trainer.max_steps=3"], env)
    assert result.returncode == 0, result.stderr
    jobs = dict(line.split() for line in result.stdout.splitlines()[1:])
    try:
        assert list(jobs) == ["vae", "decoder_ft", "cache_latents", "flow", "guidance", "consistency",
                              "consistency_phase1", "adversarial"]
        info = {run: _job(slurm, job) for run, job in jobs.items()}
        ids = list(jobs.values())
        assert info["vae"]["Dependency"] == "(null)"
        for run, prev in zip(list(jobs)[1:], ids):
            assert info[run]["Dependency"] == f"afterok:{prev}(unfulfilled)", info[run]
        # squeue %o: the script and its arguments
        cmd = {run: _run(["squeue", "-h", "-j", job, "-o", "%o"], slurm).stdout.split() for run, job in jobs.items()}
        runs = tmp_path / "runs" / "p1"
        last = {run: str(runs / run / "checkpoints" / "last.ckpt") for run in jobs}
        latents = f"latents={runs / 'latents'}"
        assert cmd["cache_latents"][1:] == ["--vae", last["decoder_ft"], "--data", "shards/train", "--out",
                                            str(runs / "latents")]
        common = ["data.train=shards/train", "data.val=shards/val", "trainer.max_steps=3", "tracking.experiment=p1",
                  f"run_root={runs}"]
        chain = {"vae": [], "decoder_ft": [f"init_from={last['vae']}"],
                 "flow": [f"vae_from={last['decoder_ft']}", latents],
                 "guidance": [f"init_from={last['flow']}", latents],
                 "consistency": [f"init_from={last['guidance']}", latents],
                 "consistency_phase1": [f"init_from={last['consistency']}", latents, "optim.lr=1e-5"],
                 "adversarial": [f"init_from={last['consistency_phase1']}", latents]}
        scripts = {"consistency": "cfd.sh", "consistency_phase1": "cfd_phase1.sh"}
        for run, own in chain.items():
            preset = str(EXP / "presets" / f"tiny-{run.removesuffix('_phase1')}.yaml")
            assert cmd[run] == [str(ROOT / "slurm" / scripts.get(run, f"{run}.sh")), preset, *common, *own], run
    finally:
        _run(["scancel", *jobs.values()], slurm)

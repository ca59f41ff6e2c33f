"""MLflow tracking: an embedded SQLite store under the run root unless a server URI is configured.

One run per stage, tagged with its ``stage`` and, when it starts from a checkpoint, its ``parent`` (and the
``parent_run_id`` of the run that wrote it, when that run is in the same store), so a pipeline can be walked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fvdm.config import ConfigError, TrackingConfig, flatten, to_yaml

RUN_ID_FILE = "mlflow_run_id"
STORE_FILE = "mlflow.db"  # the embedded store, directly under the run root


def tracking_uri(tracking: TrackingConfig, run_root: str | Path) -> str:
    """The configured server, else ``sqlite:///{run_root}/mlflow.db`` (absolute, so cwd does not matter)."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    root = Path(run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / STORE_FILE}"


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id that :func:`start_run` wrote into ``run_dir``, if any."""
    path = run_dir / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def make_logger(cfg: Any, run_dir: Path, resume: bool) -> MLFlowLogger:
    """An MLFlowLogger for this run; on resume it reattaches to the run recorded in ``run_dir``."""
    artifacts = (Path(cfg.run_root).resolve() / "mlartifacts").as_uri()
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or cfg.name,
        tracking_uri=tracking_uri(cfg.tracking, cfg.run_root),
        artifact_location=artifacts,
        tags={"stage": cfg.stage},
        run_id=recorded_run_id(run_dir) if resume else None,
    )
    return logger


def lineage_tags(cfg: Any, client: MlflowClient) -> dict[str, str]:
    """``parent``: the absolute path of the checkpoint the stage starts from (``init_from``, else the flow
    stage's ``vae_from``; none for a from-scratch VAE). ``parent_run_id``: the run that wrote it, when the
    checkpoint lies in a run dir (``{run_dir}/checkpoints/*.ckpt``) recording a run of this store."""
    source = getattr(cfg, "init_from", None) or getattr(cfg, "vae_from", None)
    if not source:
        return {}
    from fvdm.stages.checkpoints import resolve_checkpoint

    try:
        parent = resolve_checkpoint(source).resolve()
    except ConfigError:  # reported by the stage itself, with its context
        parent = Path(source).resolve()
    tags = {"parent": str(parent)}
    run_id = recorded_run_id(parent.parent.parent) if parent.parent.name == "checkpoints" else None
    if run_id:
        try:
            client.get_run(run_id)
            tags["parent_run_id"] = run_id
        except MlflowException:  # a run of another store
            pass
    return tags


def start_run(logger: MLFlowLogger, cfg: Any, run_dir: Path) -> None:
    """Create the MLflow run now, remember its id for --resume, log params, lineage tags and the resolved config.

    MLflow params are immutable: on a resumed run, a value that changed (say a longer ``max_steps``) is
    recorded as a ``resumed.<key>`` tag, and the new resolved config is saved beside the first one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_ID_FILE).write_text(logger.run_id)
    params = {k: str(v) for k, v in flatten(cfg).items()}
    logged = logger.experiment.get_run(logger.run_id).data.params
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
    config_path = run_dir / ("config.yaml" if not logged else f"config-resumed-{len(changed)}-changes.yaml")
    config_path.write_text(to_yaml(cfg))
    logger.log_hyperparams({k: v for k, v in params.items() if k not in logged})
    for key, value in changed.items():
        logger.experiment.set_tag(logger.run_id, f"resumed.{key}", value)
    for key, value in lineage_tags(cfg, logger.experiment).items():
        logger.experiment.set_tag(logger.run_id, key, value)
    logger.experiment.log_artifact(logger.run_id, str(config_path))


def log_table(client: MlflowClient, run_id: str, text: str, name: str) -> str:
    """Attach a text or markdown table (benchmark numbers, a comparison) to a run as ``tables/{name}``;
    returns the artifact path."""
    path = f"tables/{name}"
    client.log_text(run_id, text, path)
    return path

"""MLflow tracking: an embedded SQLite store under the run root unless a server URI is configured."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from fvdm.config import TrackingConfig, flatten, to_yaml

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(tracking: TrackingConfig, run_root: str | Path) -> str:
    """The configured server, else ``sqlite:///{run_root}/mlflow.db`` (absolute, so cwd does not matter)."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    root = Path(run_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def make_logger(cfg: Any, run_dir: Path, resume: bool) -> MLFlowLogger:
    """An MLFlowLogger for this run; on resume it reattaches to the run recorded in ``run_dir``."""
    run_id_path = run_dir / RUN_ID_FILE
    run_id = run_id_path.read_text().strip() if resume and run_id_path.exists() else None
    artifacts = (Path(cfg.run_root).resolve() / "mlartifacts").as_uri()
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or cfg.name,
        tracking_uri=tracking_uri(cfg.tracking, cfg.run_root),
        artifact_location=artifacts,
        tags={"stage": cfg.stage},
        run_id=run_id,
    )
    return logger


def start_run(logger: MLFlowLogger, cfg: Any, run_dir: Path) -> None:
    """Create the MLflow run now, remember its id for --resume, log params and the resolved config.

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
    logger.experiment.log_artifact(logger.run_id, str(config_path))

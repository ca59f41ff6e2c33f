"""``fvdm compare``: MLflow runs side by side, typically the stages of one pipeline (one experiment).

Prints a markdown table, a row per run (name, id, stage, parent, status, last logged step, the last value of
each chosen metric) and writes a PNG with one subplot per metric: its curve over steps for every run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fvdm.config import ConfigError, TrackingConfig
from fvdm.tracking import STORE_FILE, log_table, tracking_uri

MISSING = "-"


@dataclass
class RunCurves:
    """One run as compared: the MLflow run, its parent as shown, its last logged step and the chosen metrics'
    histories as (step, value) in logging order (metrics the run lacks are absent)."""

    run: Run
    parent: str
    last_step: int | None
    curves: dict[str, list[tuple[int, float]]]

    @property
    def name(self) -> str:
        return self.run.info.run_name


def store_uri(uri: str | None, run_root: str | Path) -> str:
    """``uri`` if given, else the embedded store under ``run_root`` that ``fvdm train`` writes (it must exist)."""
    if uri:
        return uri
    if not (Path(run_root) / STORE_FILE).is_file():
        raise ConfigError(f"no MLflow store at {Path(run_root) / STORE_FILE}; pass --run-root DIR or --tracking-uri URI")
    return tracking_uri(TrackingConfig(), run_root)


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every active run matching ``filter_string``, oldest first (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select_runs(client: MlflowClient, refs: Sequence[str], experiment: str | None = None) -> list[Run]:
    """Runs named by id or run name (a name may match several runs), else every run of ``experiment``.

    With ``experiment`` the given refs are looked up in it only. Unknown names, ids or experiments are errors.
    """
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise ConfigError(f"unknown experiment '{experiment}' (experiments in this store: {known})")
        experiment_ids = [found.experiment_id]
    elif refs:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        raise ConfigError("compare: give run ids or names, or --experiment NAME")
    if not refs:
        runs = _search(client, experiment_ids)
        if not runs:
            raise ConfigError(f"experiment '{experiment}' has no runs")
        return runs
    chosen: dict[str, Run] = {}  # by id: a run named twice is shown once
    for ref in refs:
        quote = '"' if "'" in ref else "'"
        matches = _search(client, experiment_ids, f"attributes.run_name = {quote}{ref}{quote}")
        matches = matches or _by_id(client, ref, experiment_ids)
        if not matches:
            scope = f"experiment '{experiment}'" if experiment else "this store"
            raise ConfigError(f"unknown run '{ref}': no run of {scope} has this id or name")
        for run in matches:
            chosen.setdefault(run.info.run_id, run)
    return list(chosen.values())


def _by_id(client: MlflowClient, run_id: str, experiment_ids: list[str]) -> list[Run]:
    """The run with this id when it exists in one of ``experiment_ids``, else nothing."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return []
    return [run] if run.info.experiment_id in experiment_ids else []


def _parent(client: MlflowClient, run: Run) -> str:
    """The parent run's name when the ``parent_run_id`` tag resolves, else the ``parent`` checkpoint path."""
    tags = run.data.tags
    if "parent_run_id" in tags:
        try:
            return client.get_run(tags["parent_run_id"]).info.run_name
        except MlflowException:
            pass
    return tags.get("parent", MISSING)


def load_curves(client: MlflowClient, runs: Sequence[Run], metrics: Sequence[str]) -> list[RunCurves]:
    """The chosen metrics' histories of every run; a metric logged by none of them is an error."""
    rows = []
    for run in runs:
        histories = {key: sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
                     for key in run.data.metrics}
        last_step = max((h[-1].step for h in histories.values() if h), default=None)
        curves = {m: [(p.step, p.value) for p in histories[m]] for m in metrics if histories.get(m)}
        rows.append(RunCurves(run, _parent(client, run), last_step, curves))
    for metric in metrics:
        if not any(metric in row.curves for row in rows):
            logged = sorted({key for run in runs for key in run.data.metrics})
            raise ConfigError(f"metric '{metric}' is logged by none of the runs "
                              f"({', '.join(r.name for r in rows)}); their metrics: {', '.join(logged)}")
    return rows


def format_table(rows: Sequence[RunCurves], metrics: Sequence[str]) -> str:
    """A markdown table, columns padded so it also reads as plain text; missing values are ``-``."""
    head = ["run", "id", "stage", "parent", "status", "last step", *metrics]
    body = [[row.name, row.run.info.run_id[:8], row.run.data.tags.get("stage", MISSING), row.parent,
             row.run.info.status, MISSING if row.last_step is None else str(row.last_step),
             *(f"{row.curves[m][-1][1]:.6g}" if m in row.curves else MISSING for m in metrics)] for row in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [[c.ljust(w) for c, w in zip(r, widths)] for r in [head, ["-" * w for w in widths], *body]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def plot_curves(rows: Sequence[RunCurves], metrics: Sequence[str], path: str | Path) -> Path:
    """One subplot per metric, step on x, a curve per run, legend by run name (plus id when names repeat)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [row.name for row in rows]
    labels = [n if names.count(n) == 1 else f"{n} ({row.run.info.run_id[:8]})" for n, row in zip(names, rows)]
    fig = Figure(figsize=(8, 3 * len(metrics)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric in zip(fig.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics):
        for row, label in zip(rows, labels):
            if metric in row.curves:
                steps, values = zip(*row.curves[metric])
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=label)
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def compare(refs: Sequence[str], metrics: Sequence[str], experiment: str | None = None, uri: str | None = None,
            run_root: str | Path = "runs", plot: str | Path = "compare.png", log_to: str | None = None) -> str:
    """Select the runs, write the plot and return the table; ``log_to`` (a run id or name) also gets both as
    artifacts (``tables/compare.md`` and ``compare.png``)."""
    client = MlflowClient(store_uri(uri, run_root))
    target = select_runs(client, [log_to], experiment) if log_to is not None else []
    if len(target) > 1:
        raise ConfigError(f"--log-to '{log_to}' names {len(target)} runs; give a run id")
    rows = load_curves(client, select_runs(client, refs, experiment), metrics)
    table = format_table(rows, metrics)
    plot_path = plot_curves(rows, metrics, plot)
    for run in target:
        log_table(client, run.info.run_id, table + "\n", "compare.md")
        client.log_artifact(run.info.run_id, str(plot_path))
    return table

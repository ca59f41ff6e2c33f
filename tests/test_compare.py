"""`fvdm compare` on a real MLflow store: a tiny `vae` run and a `decoder_ft` run started from its checkpoint
(both really trained), plus a hand-made run named `vae` in another experiment. Checks the lineage tags, the
printed table against the store's metric histories, the PNG, `--log-to` and the error messages."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from fvdm.cli import main
from fvdm.tracking import lineage_tags, recorded_run_id

EXP = Path(__file__).resolve().parent.parent / "experiments"
METRICS = ("train/loss", "val/v_iou")


def train_args(synth_data, run_root, stage, *extra):
    return ["train", str(EXP / f"{stage}.yaml"), str(EXP / "presets" / f"tiny-{stage}.yaml"),
            f"data.train={synth_data / 'train'}", f"data.val={synth_data / 'val'}", f"run_root={run_root}",
            "tracking.experiment=pipe", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0",
            "data.num_surface=256", "data.num_vol=128", "data.num_near=128", "eval.resolution=16",
            "eval.num_mesh_shapes=1", "eval.max_batches=1", "trainer.log_every_n_steps=1", *extra]


@pytest.fixture(scope="module")
def store(synth_data, tmp_path_factory):
    """(run_root, client): the vae -> decoder_ft chain in experiment 'pipe', a stray 'vae' run in 'other'."""
    run_root = tmp_path_factory.mktemp("runs")
    assert main(train_args(synth_data, run_root, "vae", "vae.num_latents=32", "trainer.max_steps=4",
                           "eval.every_n_steps=2")) == 0
    assert main(train_args(synth_data, run_root, "decoder_ft", "trainer.max_steps=2", "eval.every_n_steps=2",
                           f"init_from={run_root / 'vae' / 'checkpoints' / 'last.ckpt'}")) == 0
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    stray = client.create_run(client.create_experiment("other"), run_name="vae")
    client.log_metric(stray.info.run_id, "train/loss", 0.5, step=0)
    client.set_terminated(stray.info.run_id)
    return run_root, client


def ids(run_root: Path) -> tuple[str, str]:
    return recorded_run_id(run_root / "vae"), recorded_run_id(run_root / "decoder_ft")


def table_rows(out: str) -> list[list[str]]:
    """The body of the printed markdown table as cells."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def last_value(client: MlflowClient, run_id: str, metric: str) -> float:
    return max(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)).value


def test_stage_runs_carry_lineage_and_artifacts(store):
    run_root, client = store
    vae_id, dec_id = ids(run_root)
    vae, dec = client.get_run(vae_id), client.get_run(dec_id)
    assert vae.data.tags["stage"] == "vae" and "parent" not in vae.data.tags
    assert dec.data.tags["stage"] == "decoder_ft"
    assert dec.data.tags["parent"] == str((run_root / "vae" / "checkpoints" / "last.ckpt").resolve())
    assert dec.data.tags["parent_run_id"] == vae_id
    assert vae.info.experiment_id == dec.info.experiment_id == client.get_experiment_by_name("pipe").experiment_id
    # the resolved config and the eval callback's preview (the 2-step model's meshes are empty, so no PLY here:
    # tests/test_eval_callback.py checks PLY artifacts with an exact model)
    assert "config.yaml" in [a.path for a in client.list_artifacts(dec_id)]
    step_dir = client.list_artifacts(dec_id, "reconstructions")[-1].path
    assert f"{step_dir}/preview.png" in [a.path for a in client.list_artifacts(dec_id, step_dir)]


def test_parent_of_another_store_has_no_run_id(store, tmp_path):
    run_root, _ = store
    ckpt = run_root / "vae" / "checkpoints" / "last.ckpt"
    other = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert lineage_tags(SimpleNamespace(init_from=None, vae_from=str(ckpt)), other) == {"parent": str(ckpt.resolve())}
    assert lineage_tags(SimpleNamespace(), other) == {}


def test_compare_experiment_table_and_plot(store, tmp_path, capsys):
    run_root, client = store
    vae_id, dec_id = ids(run_root)
    png = tmp_path / "plots" / "pipe.png"
    assert main(["compare", "--experiment", "pipe", "--metrics", *METRICS, "--run-root", str(run_root),
                 "--plot", str(png)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [("vae", vae_id[:8], "vae", "-", "FINISHED"),
                                                            ("decoder_ft", dec_id[:8], "decoder_ft", "vae", "FINISHED")]
    for row, run_id in zip(rows, (vae_id, dec_id)):
        run = client.get_run(run_id)
        steps = [m.step for key in run.data.metrics for m in client.get_metric_history(run_id, key)]
        assert int(row[5]) == max(steps)
        for cell, metric in zip(row[6:], METRICS):
            assert float(cell) == pytest.approx(last_value(client, run_id, metric), rel=1e-5)
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (800, 600)  # 8 x 3 inches per metric at 100 dpi
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # curves and text, not a blank canvas


def test_compare_by_name_and_id_with_log_to(store, tmp_path, capsys):
    run_root, client = store
    vae_id, dec_id = ids(run_root)
    stray_id = client.search_runs([client.get_experiment_by_name("other").experiment_id])[0].info.run_id
    png = tmp_path / "c.png"
    assert main(["compare", "vae", dec_id, "--metrics", *METRICS, "--run-root", str(run_root), "--plot", str(png),
                 "--log-to", "decoder_ft"]) == 0
    out = capsys.readouterr().out
    rows = {r[1]: r for r in table_rows(out)}
    assert set(rows) == {vae_id[:8], stray_id[:8], dec_id[:8]}  # the name 'vae' is in both experiments
    assert rows[stray_id[:8]][6:] == [f"{0.5:.6g}", "-"]
    assert float(rows[dec_id[:8]][7]) == pytest.approx(last_value(client, dec_id, "val/v_iou"), rel=1e-5)
    logged = {a.path for a in client.list_artifacts(dec_id)} | {a.path for a in client.list_artifacts(dec_id, "tables")}
    assert {"tables/compare.md", "c.png"} <= logged
    table = client.download_artifacts(dec_id, "tables/compare.md", str(tmp_path))
    assert Path(table).read_text().strip() in out
    # scoped to an experiment, the name picks that experiment's run only
    assert main(["compare", "vae", "--experiment", "pipe", "--metrics", "train/loss", "--run-root", str(run_root),
                 "--plot", str(png)]) == 0
    assert [r[1] for r in table_rows(capsys.readouterr().out)] == [vae_id[:8]]


@pytest.mark.parametrize("argv, message", [
    (["nope", "--metrics", "train/loss"], "unknown run 'nope'"),
    (["--experiment", "nope", "--metrics", "train/loss"], "unknown experiment 'nope' (experiments in this store:"),
    (["vae", "--experiment", "other", "--metrics", "val/nope"], "metric 'val/nope' is logged by none of the runs"),
    (["--metrics", "train/loss"], "give run ids or names, or --experiment"),
    (["decoder_ft", "--metrics", "train/loss", "--log-to", "vae"], "--log-to 'vae' names 2 runs"),
])
def test_compare_errors(store, tmp_path, capsys, argv, message):
    run_root, _ = store
    png = tmp_path / "never.png"
    assert main(["compare", *argv, "--run-root", str(run_root), "--plot", str(png)]) == 2
    assert message in capsys.readouterr().err
    assert not png.exists()


def test_compare_without_store(tmp_path, capsys):
    assert main(["compare", "vae", "--metrics", "train/loss", "--run-root", str(tmp_path)]) == 2
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in capsys.readouterr().err

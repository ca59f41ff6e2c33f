"""The training benchmarks run end to end at tiny sizes and write well-formed records."""
from __future__ import annotations

import json

import pytest

from fvdm.bench.results import git_commit, record
from fvdm.bench.training import WallClockCosine
from fvdm.cli import main
from fvdm.stages.checkpoints import load_pretrained_vae


def test_bench_vae_and_decode_records(tmp_path, capsys):
    results = tmp_path / "results.json"
    common = ["--preset", "tiny", "--workers", "1", "--batch-size", "2", "--num-points", "256",
              "--results", str(results)]
    assert main(["bench", "vae", "--minutes", "0.1", "--steps", "3", "--shapes", "6", "--num-surface", "448",
                 "--num-sharp", "64", "--curve-every", "1",
                 "--resolution", "24", "--data", str(tmp_path / "vae-data"), "--run-root", str(tmp_path / "runs"),
                 *common]) == 0
    assert main(["bench", "decode", "--train-minutes", "0.05", "--resolution", "48", "--train-shapes", "6",
                 "--eval-shapes", "1", "--timing-shapes", "1", "--repeats", "1",
                 "--data", str(tmp_path / "decode-data"), "--run-root", str(tmp_path / "runs"), *common]) == 0
    # the VAE the first run saved, with only its efficient decoder trained here, on the first run's shards
    assert main(["bench", "decode", "--vae", str(tmp_path / "runs" / "bench-vae-tiny.ckpt"), "--train-minutes",
                 "0.05", "--resolution", "48", "--eval-shapes", "1", "--timing-shapes", "1", "--repeats", "1",
                 "--compile", "--data", str(tmp_path / "vae-data"), "--run-root", str(tmp_path / "runs2"),
                 *common]) == 0
    vae, decode, decode_from_vae = json.loads(results.read_text())
    assert vae["bench"] == "vae" and vae["figures"]["steps"] >= 1
    # one curve line per step, with the interval's mean/max loss and gradient norm
    curve = [line for line in capsys.readouterr().out.splitlines() if line.startswith("curve step")]
    assert len(curve) == vae["figures"]["steps"] and all(" grad_norm " in c and " loss " in c for c in curve)
    assert float(curve[0].split(" lr ")[1].split()[0]) == pytest.approx(3e-4 / 1000, rel=0.01)  # warm-up step 1/1,000
    # a sharp-edge pool: the encoder's input is 448 uniform rows, then 64 edge rows (the third run decoded them)
    assert vae["figures"]["num_sharp"] == 64
    pools = load_pretrained_vae(tmp_path / "runs" / "bench-vae-tiny.ckpt").cfg
    assert (pools.pc_size, pools.pc_sharpedge_size) == (448, 64)
    assert len(decode_from_vae["figures"]["train_steps"]) == 1  # decoder_ft only
    held = decode_from_vae["figures"]["held_out"]  # the eval callback's metric on every held-out shape, both models
    assert held["standard"]["shapes"] == held["efficient"]["shapes"] >= 1
    assert held["v_iou_drop_points"] == round(100 * (held["standard"]["v_iou"] - held["efficient"]["v_iou"]), 2)
    assert decode_from_vae["figures"]["compiled"] and not decode["figures"]["compiled"]
    assert decode["figures"]["vae_schedule"] == {"lr": 2e-4, "warmup": 1000}  # trained here; the other loaded it
    assert decode_from_vae["figures"]["vae_schedule"] is None
    assert decode_from_vae["figures"]["efficient"]["geo_mlp_ratio"] == 1  # the decoder_ft student
    assert (tmp_path / "runs2" / "bench-decode-decoder_ft.ckpt").is_file()
    assert not (tmp_path / "runs2" / "bench-decode-vae.ckpt").exists()
    for key in ("v_iou", "s_iou", "v_iou_baseline", "s_iou_baseline", "decode_ms"):
        assert key in vae["figures"], key
    # without --num-sharp the pools still follow the rows streamed: --num-surface uniform rows, no edge pool
    assert main(["bench", "vae", "--minutes", "0.1", "--steps", "1", "--shapes", "6", "--num-surface", "320",
                 "--resolution", "16", "--data", str(tmp_path / "vae-data"), "--run-root", str(tmp_path / "runs3"),
                 *common]) == 0
    pools = load_pretrained_vae(tmp_path / "runs3" / "bench-vae-tiny.ckpt").cfg
    assert (pools.pc_size, pools.pc_sharpedge_size) == (320, 0)
    rows = {r["row"]: r for r in decode["figures"]["rows"]}
    assert list(rows) == ["dense", "+ hierarchical", "+ efficient decoder", "+ adaptive KV selection",
                          "+ narrow cascade", "narrow cascade, exact attention"]
    assert rows["+ hierarchical"]["queries"] <= rows["dense"]["queries"]
    assert rows["narrow cascade, exact attention"]["queries"] <= rows["+ efficient decoder"]["queries"]
    assert rows["+ adaptive KV selection"]["attention_gflops"] < rows["+ efficient decoder"]["attention_gflops"]


def test_wall_clock_cosine_warms_up_by_step_and_decays_by_time():
    schedule = WallClockCosine(seconds=100, warmup_steps=4, min_lr_ratio=0.1)
    assert [schedule.multiplier(step, 0) for step in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert schedule.multiplier(10, 50) == pytest.approx(0.55)  # half the cap: halfway from 1 to 0.1
    assert schedule.multiplier(10, 100) == schedule.multiplier(10, 500) == pytest.approx(0.1)  # the cap and after
    assert schedule.multiplier(1, 100) == pytest.approx(0.05)  # a warm-up longer than the run scales the floor


def test_quickstart_summary_table():
    from fvdm.quickstart import STAGES, summary

    results = {
        "vae": {"val/v_iou": 0.56, "val/decode_ms": 1282.8, "minutes": 4.25},
        "decoder_ft": {"val/v_iou": 0.585, "val/decode_ms": 540.0, "minutes": 1.5},
        "flow": {"val/gen_v_iou": 0.247, "val/gen_v_iou_uncond": 0.3, "minutes": 3.0},
        # guidance missing entirely
        "consistency": {"val/student_5step_iou_vs_teacher50": 0.82, "val/teacher_5step_iou_vs_teacher50": 0.758,
                        "val/student_1step_iou_vs_teacher50": 0.38, "minutes": 2.0},
        "consistency_phase1": {"val/student_5step_iou_vs_teacher50": 0.882, "minutes": 1.0},
        "adversarial": {"minutes": 0.5},  # ran, no metrics
        "synth": {"minutes": 1.25},
    }
    lines = summary(results, scales=dict.fromkeys(STAGES, 0.25)).splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in (
        "vae", "decoder_ft", "flow", "guidance", "teacher", "consistency", "consistency_phase1", "adversarial")}
    assert [r for r in rows] == ["vae", "decoder_ft", "flow", "guidance", "teacher", "consistency",
                                 "consistency_phase1", "adversarial"]
    head = lines[0]
    assert "key metric" in head and "decode ms" in head and "5-step IoU vs teacher" in head and "minutes" in head
    assert rows["vae"] == ["vae", "v_iou=0.5600", "1283", "-", "4.2"]
    assert rows["decoder_ft"] == ["decoder_ft", "v_iou=0.5850", "540", "-", "1.5"]
    assert rows["flow"] == ["flow", "gen_v_iou=0.2470", "540*", "-", "3.0"]  # decodes with the decoder_ft VAE
    assert rows["guidance"] == ["guidance", "-", "540*", "-", "-"]
    assert rows["teacher"][-2:] == ["0.7580", "-"] and " ".join(rows["teacher"][:4]) == "teacher (Euler, 5 steps)"
    assert rows["consistency"] == ["consistency", "student_5step_iou_vs_teacher50=0.8200", "540*", "0.8200", "2.0"]
    assert rows["consistency_phase1"][-2:] == ["0.8820", "1.0"]
    assert rows["adversarial"] == ["adversarial", "-", "540*", "-", "0.5"]
    assert any(line.startswith("* ") and "decoder_ft" in line for line in lines)
    assert any("synth 1.2 min" in line and "total 13.5 min at scale 0.25." in line for line in lines)
    mixed = " ".join(summary(results, scales={"vae": 1.0, "decoder_ft": 1.0, "flow": 0.25}).split())
    assert "total 13.5 min at scale 1 (vae, decoder_ft), 0.25 (flow)." in mixed
    # no VAE at all: nothing to decode with, "-" without the footnote mark
    assert summary({}).splitlines()[4].split() == ["flow", "-", "-", "-", "-"]


def test_quickstart_scaled_overrides():
    from fvdm.config import EXPERIMENTS
    from fvdm.quickstart import scaled_overrides
    from fvdm.train import resolve

    def cfg(name: str, *extra: str):
        return resolve([str(EXPERIMENTS / f"{name}.yaml"), str(EXPERIMENTS / "presets" / f"tiny-{name}.yaml"),
                        "data.train=x", "data.val=y", *extra])

    assert scaled_overrides(cfg("flow"), 1.0) == []  # the full-size chain: the presets as they are
    flow = dict(o.split("=") for o in scaled_overrides(cfg("flow"), 0.25))  # 1500 steps, warm-up 50
    assert flow["trainer.max_steps"] == flow["trainer.val_every_n_steps"] == "375"
    assert flow["trainer.checkpoint_every_n_steps"] == "375" and flow["optim.warmup_steps"] == "13"
    vae = dict(o.split("=") for o in scaled_overrides(cfg("vae"), 0.25))  # 1100 steps, evaluation at the end
    assert vae["trainer.max_steps"] == vae["eval.every_n_steps"] == "275"
    tiny = dict(o.split("=") for o in scaled_overrides(cfg("guidance", "init_from=z"), 0.01))
    assert tiny["trainer.max_steps"] == "10" and int(tiny["optim.warmup_steps"]) < 10
    adversarial = scaled_overrides(cfg("adversarial", "init_from=z"), 0.5)  # no warm-up: none added
    assert not any("warmup" in o for o in adversarial)


def test_bench_guidance_records_teacher_and_students(tmp_path):
    """The teacher's four IoUs and each student's IoU against the teacher and its band errors, every number from
    two noise draws per held-out shape."""
    results = tmp_path / "results.json"
    assert main(["bench", "guidance", "--root", str(tmp_path / "root"), "--shapes", "12", "--vae-scale", "0.001",
                 "--flow-steps", "2", "--guidance-steps", "1", "--batch-size", "2", "--workers", "0",
                 "--noise-draws", "2", "--eval-batches", "1", "--student", "plain",
                 "--student", "shift3:timesteps.shift=3 eval.steps=4", "--no-tracking", "--results", str(results)]) == 0
    (entry,) = json.loads(results.read_text())
    figures = entry["figures"]
    assert entry["bench"] == "guidance" and figures["noise_draws"] == 2
    assert set(figures["teacher"]) == {"gen_v_iou", "gen_v_iou_w1", "gen_v_iou_uncond", "recon_v_iou"}
    assert list(figures["students"]) == ["plain", "shift3"]
    assert figures["students"]["shift3"]["overrides"] == ["timesteps.shift=3", "eval.steps=4"]
    for student in figures["students"].values():
        assert 0 <= student["student_teacher_v_iou"] <= 1 and student["vel_rel_err_t0"] > 0
    assert {"synth", "vae", "decoder_ft", "cache_latents", "flow"} <= set(figures["stage_minutes"])
    assert (tmp_path / "root" / "runs" / "flow" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "root" / "runs" / "mlflow.db").exists()  # --no-tracking

    # the same teacher's sensitivity: w = 5 is the reference itself, exactly; every other variant is an IoU
    teacher, shards = tmp_path / "root" / "runs" / "flow" / "checkpoints" / "last.ckpt", tmp_path / "root" / "data"
    assert main(["bench", "sensitivity", "--checkpoint", str(teacher), "--data", str(shards / "train"),
                 "--shapes", "3", "--steps", "4", "--scales", "5,1", "--random", "0,0.5", "--band-scales", "1",
                 "--points", "512", "--results", str(results)]) == 0
    figures = json.loads(results.read_text())[-1]["figures"]
    iou = figures["iou_vs_reference"]
    assert figures["shapes"] == 3 and iou["w 5"] == iou["random 0"] == 1.0
    assert set(iou) == {"w 5", "w 1", "steps 8", "random 0", "random 0 t<0.4", "random 0.5", "random 0.5 t<0.4"}
    assert len(figures["band_at_w1"]) == 5
    assert all(0 <= v <= 1 for v in [*iou.values(), *figures["band_at_w1"], figures["teacher_vs_reconstruction"]])


def test_record_names_the_commit_from_fvdm_commit(tmp_path, monkeypatch):
    """A copied tree's git metadata can lag its files: FVDM_COMMIT, when set, is the commit recorded."""
    monkeypatch.delenv("FVDM_COMMIT", raising=False)
    from_git = git_commit()
    monkeypatch.setenv("FVDM_COMMIT", "abc1234+tree")
    entry = record("probe", {"x": 1}, path=tmp_path / "r.json")
    assert entry["commit"] == "abc1234+tree" != from_git
    assert json.loads((tmp_path / "r.json").read_text())[0]["commit"] == "abc1234+tree"

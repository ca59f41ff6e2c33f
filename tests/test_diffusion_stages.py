"""The diffusion stages on real shards: the ``flow`` teacher trains with MLflow tracking and resumes, its
checkpoint starts ``guidance`` distillation (student = teacher exactly at step 0, teacher never moves), and
``fvdm sample`` turns an image into a mesh."""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from fvdm.cli import main
from fvdm.models.vae import VAEConfig, VecSetVAE
from fvdm.stages.checkpoints import load_diffusion, load_pretrained_vae, save_vae_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"


def args(synth_data, run_root, stage, *extra):
    return [str(EXP / f"{stage}.yaml"), str(EXP / "presets" / f"tiny-{stage}.yaml"),
            f"data.train={synth_data / 'train'}", f"data.val={synth_data / 'val'}", f"run_root={run_root}",
            "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "data.num_surface=256",
            "data.num_vol=256", "eval.steps=2", "eval.max_batches=1", "trainer.log_every_n_steps=1", *extra]


def run_of(run_root: Path, name: str):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_vae_checkpoint(VecSetVAE(VAEConfig(num_latents=32)), tmp_path_factory.mktemp("vae") / "vae.ckpt")


@pytest.fixture(scope="module")
def flow_run(synth_data, vae_ckpt, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs")
    assert main(["train", *args(synth_data, run_root, "flow", f"vae_from={vae_ckpt}", "trainer.max_steps=4",
                                "trainer.val_every_n_steps=4", "trainer.checkpoint_every_n_steps=2",
                                "trainer.monitor=val/gen_v_iou")]) == 0
    return run_root


def test_flow_stage_trains_and_logs(flow_run, vae_ckpt):
    client, run = run_of(flow_run, "flow")
    for key in ("train/loss", "train/latent_scale", "val/gen_v_iou", "val/gen_v_iou_w1", "val/gen_v_iou_uncond",
                "val/recon_v_iou"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples/step_0000004")]
    assert "samples/step_0000004/preview.png" in samples  # generated meshes beside the ground truth
    dit, vae, conditioner = load_diffusion(flow_run / "flow" / "checkpoints" / "last.ckpt")
    source = load_pretrained_vae(vae_ckpt)
    frozen, trained = source.state_dict(), vae.state_dict()
    assert all(torch.equal(frozen[k], trained[k]) for k in frozen if k != "latent_scale_bits")  # VAE untouched
    assert vae.scale_factor != 1.0 and vae.scale_factor == pytest.approx(run.data.metrics["train/latent_scale"])
    assert dit.cfg.in_channels == vae.cfg.embed_dim and dit.cfg.context_in_dim == conditioner.out_dim
    assert not dit.cfg.guidance_embed


def test_flow_resume_keeps_the_latent_scale(flow_run, synth_data, vae_ckpt):
    ckpt = flow_run / "flow" / "checkpoints" / "last.ckpt"
    scale = load_diffusion(ckpt)[1].scale_factor
    assert main(["train", *args(synth_data, flow_run, "flow", f"vae_from={vae_ckpt}", "trainer.max_steps=6",
                                "trainer.val_every_n_steps=100", "trainer.checkpoint_every_n_steps=2"),
                 "--resume"]) == 0
    client, run = run_of(flow_run, "flow")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(6))
    assert load_diffusion(ckpt)[1].scale_factor == scale  # estimated once per run, not again on resume


def _stage(synth_data, flow_run, tmp_path, *extra):
    from fvdm.stages.guidance import GuidanceDistillation
    from fvdm.train import resolve

    cfg = resolve(args(synth_data, tmp_path, "guidance",
                       f"init_from={flow_run / 'flow' / 'checkpoints' / 'last.ckpt'}", *extra))
    return GuidanceDistillation(cfg)


def test_guidance_student_starts_as_the_teacher(synth_data, flow_run, tmp_path):
    stage = _stage(synth_data, flow_run, tmp_path)
    x, cond = torch.randn(2, 32, 32), torch.randn(2, stage.conditioner.num_tokens, stage.conditioner.out_dim)
    t = torch.tensor([0.2, 0.9])
    v_teacher = stage.teacher(x, t, cond)
    for w in (1.0, 2.0, 7.5):
        assert torch.equal(stage.dit(x, t, cond, guidance=torch.full((2,), w)), v_teacher)
    assert {id(p) for p in stage.teacher.parameters()}.isdisjoint(
        {id(p) for g in stage.configure_optimizers()["optimizer"].param_groups for p in g["params"]})


def test_guidance_distillation_learns_the_guided_velocity(synth_data, flow_run, tmp_path):
    """A few steps on one batch lower the loss; the teacher's bits never change."""
    from fvdm.data.datamodule import ShapeDataModule

    torch.manual_seed(0)
    stage = _stage(synth_data, flow_run, tmp_path, "optim.lr=3e-3", "optim.warmup_steps=0")
    teacher_before = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    batch = next(iter(ShapeDataModule(stage.cfg.data).train_dataloader()))
    opt = stage.configure_optimizers()["optimizer"]
    stage.train()
    losses = []
    for _ in range(25):
        torch.manual_seed(1)  # the same t, w and noise every step: a fixed regression problem
        loss = stage.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in stage.teacher.state_dict().items())
    assert stage.teacher.training is False and stage.vae.training is False


def test_eval_noise_draws_are_fixed_and_independent(synth_data, flow_run, tmp_path):
    """Draw 0 is the single-draw noise; further draws differ from it and repeat at every evaluation; a shape's
    noise (and its guidance band times) follows its key, not its place in the batch."""
    from fvdm.config import ConfigError

    like = torch.empty(2, 32, 32)
    batch = {"key": ["shape_a", "shape_b"]}
    single = [noise for _, noise in _stage(synth_data, flow_run, tmp_path).eval_noise(batch, 3, like)]
    stage = _stage(synth_data, flow_run, tmp_path, "eval.noise_draws=3")
    draws = list(stage.eval_noise(batch, 3, like))
    assert [d for d, _ in draws] == [0, 1, 2] and len(single) == 1
    assert torch.equal(draws[0][1], single[0])
    assert not torch.equal(draws[1][1], draws[0][1]) and not torch.equal(draws[2][1], draws[1][1])
    assert not torch.equal(draws[0][1][0], draws[0][1][1])  # two shapes, two noises
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(draws, stage.eval_noise(batch, 3, like)))
    swapped = list(stage.eval_noise({"key": ["shape_b", "shape_a"]}, 0, like))
    assert all(torch.equal(a, b.flip(0)) for (_, a), (_, b) in zip(draws, swapped))
    keyless = [noise for _, noise in stage.eval_noise({}, 3, like)]  # batches without keys: by batch index
    again = [noise for _, noise in stage.eval_noise({}, 3, like)]
    assert len(keyless) == 3 and all(torch.equal(a, b) for a, b in zip(keyless, again))
    assert not torch.equal(keyless[0], next(stage.eval_noise({}, 4, like))[1])
    # the guidance band times: keyed like the noise, one stream per band, uniform in [0, 1)
    band = stage.eval_values(batch, 3, 0, (2,), torch.rand, stream="band1")
    assert torch.equal(band.flip(0), stage.eval_values({"key": ["shape_b", "shape_a"]}, 0, 0, (2,), torch.rand,
                                                       stream="band1"))
    assert not torch.equal(band, stage.eval_values(batch, 3, 0, (2,), torch.rand, stream="band2"))
    assert band.shape == (2,) and bool(((band >= 0) & (band < 1)).all())
    with pytest.raises(ConfigError, match="noise_draws"):
        _stage(synth_data, flow_run, tmp_path, "eval.noise_draws=0")


def test_guidance_stage_runs_and_chains(synth_data, flow_run, tmp_path):
    ckpt = flow_run / "flow" / "checkpoints" / "last.ckpt"
    assert main(["train", *args(synth_data, tmp_path, "guidance", f"init_from={ckpt}", "trainer.max_steps=2",
                                "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2",
                                "eval.noise_draws=2")]) == 0
    _, run = run_of(tmp_path, "guidance")
    for key in ("train/loss", "val/vel_rel_err_t0", "val/vel_rel_err_t4", "val/student_teacher_v_iou",
                "val/gen_v_iou", "val/teacher_gen_v_iou"):
        assert key in run.data.metrics, key
    student, _, _ = load_diffusion(tmp_path / "guidance" / "checkpoints" / "last.ckpt")
    assert student.cfg.guidance_embed
    # a guidance-distilled model cannot start another guidance distillation
    assert main(["train", *args(synth_data, tmp_path, "guidance", "name=again", "trainer.max_steps=1",
                                f"init_from={tmp_path / 'guidance' / 'checkpoints' / 'last.ckpt'}")]) == 2


def test_sample_cli_writes_meshes(flow_run, synth_data, tmp_path):
    from fvdm.data.shards import decode_sample, read_samples

    raw = next(iter(read_samples(sorted((synth_data / "val").glob("*.tar"))[0])))
    image = tmp_path / "view.png"
    Image.fromarray(decode_sample(raw).renders[0]).save(image)
    out = tmp_path / "meshes"
    assert main(["sample", "--checkpoint", str(flow_run / "flow" / "checkpoints" / "last.ckpt"), "--image",
                 str(image), "--out", str(out), "--steps", "2", "--resolution", "16", "--device", "cpu"]) == 0
    assert (out / "view.ply").is_file()


def test_cache_latents_feeds_the_flow_stage(synth_data, vae_ckpt, tmp_path):
    from fvdm.config import DataConfig
    from fvdm.data.datamodule import ShapeDataModule
    from fvdm.data.latents import read_index

    out = tmp_path / "latents"
    assert main(["cache-latents", "--vae", str(vae_ckpt), "--data", str(synth_data / "train"), "--out", str(out),
                 "--num-surface", "256", "--batch-size", "4", "--device", "cpu"]) == 0
    index = read_index(out)
    assert index["shapes"] == 9 and index["latent_shape"] == [32, 32] and index["scale_factor"] > 0
    cfg = DataConfig(train="unused", val=str(synth_data / "val"), batch_size=3, num_workers=0)
    batch = next(iter(ShapeDataModule(cfg, latents=str(out)).train_dataloader()))
    assert batch["latents"].shape == (3, 32, 32) and batch["image"].shape[:2] == (3, 3)
    assert "surface" not in batch
    # cached latents are DiT-space: about unit variance after the estimated scale
    assert 0.5 < float(batch["latents"].std()) < 2.0

    run_root = tmp_path / "runs"
    assert main(["train", *args(synth_data, run_root, "flow", f"vae_from={vae_ckpt}", f"latents={out}",
                                "trainer.max_steps=2", "trainer.val_every_n_steps=2")]) == 0
    _, vae, _ = load_diffusion(run_root / "flow" / "checkpoints" / "last.ckpt")
    assert vae.scale_factor == index["scale_factor"]
    # latents made by another VAE are refused
    other = save_vae_checkpoint(VecSetVAE(VAEConfig(num_latents=32)), tmp_path / "other.ckpt")
    assert main(["train", *args(synth_data, run_root, "flow", f"vae_from={other}", f"latents={out}", "name=x",
                                "trainer.max_steps=1")]) == 2


def test_convert_exports_a_diffusion_checkpoint_as_a_bundle(flow_run, tmp_path):
    from fvdm.interop.hunyuan3d import load_dit_bundle

    ckpt = flow_run / "flow" / "checkpoints" / "last.ckpt"
    assert main(["convert", str(ckpt), str(tmp_path / "bundle"), "--to", "hunyuan3d", "--dtype", "fp32"]) == 0
    bundle = load_dit_bundle(tmp_path / "bundle")
    dit, vae, _ = load_diffusion(ckpt)
    assert bundle.conditioner is None  # the small encoder has no released counterpart
    assert all(torch.equal(a, b) for a, b in zip(bundle.dit.state_dict().values(), dit.state_dict().values()))
    assert bundle.vae.scale_factor == vae.scale_factor
    assert main(["convert", str(ckpt), str(tmp_path / "x.ckpt"), "--to", "fvdm"]) == 2


def test_guidance_ema_is_held_scored_and_handed_on(synth_data, flow_run, tmp_path):
    """With ema_decay the stage keeps an fp32 EMA of the student outside the module and the optimizer, scores it,
    and its checkpoint hands the EMA on (load_diffusion) while keeping the raw student for a resumed run."""
    from fvdm.config import ConfigError
    from fvdm.stages.base import HELD_STATE_KEY
    from fvdm.stages.checkpoints import submodule_state

    plain = _stage(synth_data, flow_run, tmp_path, "ema_decay=null")
    assert plain.ema is None and plain.delivered is plain.dit
    stage = _stage(synth_data, flow_run, tmp_path, "ema_decay=0.9")
    assert stage.delivered is stage.ema and "ema" not in dict(stage.named_children())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in stage.ema.parameters())
    assert {id(p) for p in stage.ema.parameters()}.isdisjoint(
        {id(p) for g in stage.configure_optimizers()["optimizer"].param_groups for p in g["params"]})
    with pytest.raises(ConfigError, match="ema_decay"):
        _stage(synth_data, flow_run, tmp_path, "ema_decay=1.0")

    ckpt = flow_run / "flow" / "checkpoints" / "last.ckpt"
    assert main(["train", *args(synth_data, tmp_path, "guidance", f"init_from={ckpt}", "ema_decay=0.9",
                                "optim.lr=1e-3", "optim.warmup_steps=0", "trainer.max_steps=3",
                                "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=3")]) == 0
    path = tmp_path / "guidance" / "checkpoints" / "last.ckpt"
    stored = torch.load(path, map_location="cpu", weights_only=False)
    ema, student = stored[HELD_STATE_KEY]["ema"], submodule_state(stored["state_dict"], "dit")
    delivered = load_diffusion(path)[0].state_dict()
    assert delivered.keys() == ema.keys() and all(torch.equal(delivered[k], ema[k]) for k in ema)
    # the warmed-up decays (1/10, 2/11, 3/12) leave the EMA between the zero-initialised embedding and the student
    out = "guidance_in.out_layer.weight"
    assert bool(ema[out].abs().sum() > 0) and not torch.equal(ema[out], student[out].float())


# --------------------------------------------------------------------------------------------------------
# consistency distillation
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guidance_ckpt(synth_data, flow_run, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("guidance")
    assert main(["train", *args(synth_data, run_root, "guidance", f"init_from={flow_run / 'flow'}:best",
                                "trainer.max_steps=2", "trainer.val_every_n_steps=100")]) == 0
    return run_root / "guidance" / "checkpoints" / "last.ckpt"


def _consistency(synth_data, init_from, tmp_path, *extra):
    from fvdm.stages.consistency import ConsistencyDistillation
    from fvdm.train import resolve

    cfg = resolve(args(synth_data, tmp_path, "consistency", f"init_from={init_from}", *extra))
    return ConsistencyDistillation(cfg)


def test_consistency_ema_update_is_the_formula(synth_data, guidance_ckpt, tmp_path):
    stage = _consistency(synth_data, guidance_ckpt, tmp_path, "ema_decay=0.9")
    with torch.no_grad():
        for p in stage.dit.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in stage.target.parameters()]
    stage.update_target()
    for old, new, student in zip(before, stage.target.parameters(), stage.dit.parameters()):
        # the formula in float64, to float32 rounding
        torch.testing.assert_close(new.double(), 0.9 * old.double() + 0.1 * student.double(), rtol=1e-6, atol=1e-7)
        assert new.dtype == torch.float32 and not new.requires_grad


def test_held_modules_stay_outside_the_module_in_fp32_and_ride_in_checkpoints(synth_data, guidance_ckpt, tmp_path):
    from fvdm.stages.base import HELD_STATE_KEY

    stage = _consistency(synth_data, guidance_ckpt, tmp_path)
    assert set(stage.held) == {"vae", "conditioner", "teacher", "target"}
    assert all(name.startswith("dit.") for name, _ in stage.named_parameters())  # the optimizer, DDP, DeepSpeed
    assert all(key.startswith("dit.") for key in stage.state_dict())
    stage.to(torch.bfloat16)  # what a precision plugin or DeepSpeed's bf16 mode does to the module
    assert next(stage.dit.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for name in ("teacher", "target") for p in stage.held[name].parameters())
    with torch.no_grad():
        for p in stage.target.parameters():
            p.add_(1.0)  # as if the EMA had moved
    checkpoint: dict = {}
    stage.on_save_checkpoint(checkpoint)
    fresh = _consistency(synth_data, guidance_ckpt, tmp_path)
    fresh.on_load_checkpoint(checkpoint)  # what --resume does
    assert set(checkpoint[HELD_STATE_KEY]) == set(stage.held)
    assert all(torch.equal(a, b) for a, b in zip(fresh.target.parameters(), stage.target.parameters()))


def test_consistency_target_is_the_teacher_point_on_an_edge(synth_data, guidance_ckpt, tmp_path):
    stage = _consistency(synth_data, guidance_ckpt, tmp_path)
    grid = stage.cfg.grid
    j = torch.tensor([19, 39, 99, 5])  # the first three step onto an edge
    t, t_next, s = grid.times(j)
    cond = torch.randn(4, stage.conditioner.num_tokens, stage.conditioner.out_dim)
    x_t = torch.randn(4, 32, 32)
    from fvdm.flow import euler_step
    from fvdm.sampler import guided_velocity

    _, y_target, _ = stage.edge_points(x_t, t, t_next, s, cond)
    with torch.no_grad():
        x_next = euler_step(x_t, guided_velocity(stage.teacher, x_t, t, cond, None, torch.full((4,), 5.0)),
                            t, t_next)
    assert torch.equal(y_target[:3], x_next[:3])
    assert not torch.equal(y_target[3], x_next[3])


def test_consistency_loss_is_zero_for_a_straight_line_teacher(synth_data, guidance_ckpt, tmp_path):
    """A teacher with a constant velocity field integrates exactly; a student equal to it is consistent."""
    stage = _consistency(synth_data, guidance_ckpt, tmp_path)
    with torch.no_grad():
        for net in (stage.teacher, stage.dit, stage.target):
            net.final_layer.linear.weight.zero_()
            net.final_layer.linear.bias.copy_(torch.linspace(-1, 1, net.cfg.in_channels))
    x1 = torch.randn(4, 32, 32)
    cond = torch.randn(4, stage.conditioner.num_tokens, stage.conditioner.out_dim)
    loss, _ = stage.consistency_loss(x1, cond)
    assert float(loss) < 1e-6


def test_consistency_learns_on_a_fixed_batch_and_leaves_the_teacher(synth_data, guidance_ckpt, tmp_path):
    from fvdm.data.datamodule import ShapeDataModule

    stage = _consistency(synth_data, guidance_ckpt, tmp_path, "optim.lr=1e-3", "optim.warmup_steps=0",
                         "loss=l2", "ema=false")
    teacher = {k: v.clone() for k, v in stage.teacher.state_dict().items()}
    batch = next(iter(ShapeDataModule(stage.cfg.data).train_dataloader()))
    opt = stage.configure_optimizers()["optimizer"]
    stage.train()
    losses = []
    for _ in range(25):
        torch.manual_seed(3)  # same grid indices and noise: a fixed problem
        loss = stage.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in stage.teacher.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, teacher[k]) for k, v in stage.teacher.state_dict().items())


def test_consistency_chain_phase1_and_sampling(synth_data, flow_run, guidance_ckpt, tmp_path):
    """consistency (5 phases) -> phase-1 finetune, which keeps the original teacher; 2-step sampling; the few-step
    table of ``fvdm bench fewstep`` over the chain."""
    run_root = tmp_path / "runs"
    assert main(["train", *args(synth_data, run_root, "consistency", f"init_from={guidance_ckpt}",
                                "trainer.max_steps=2", "trainer.val_every_n_steps=2", "eval.student_steps=[1,5]",
                                "eval.steps=3")]) == 0
    _, run = run_of(run_root, "consistency")
    for key in ("train/loss", "val/student_5step_iou_vs_teacher3", "val/teacher_1step_iou_vs_teacher3"):
        assert key in run.data.metrics, key
    first = run_root / "consistency" / "checkpoints" / "last.ckpt"
    assert main(["train", str(EXP / "consistency.yaml"), str(EXP / "consistency_phase1.yaml"),
                 *args(synth_data, run_root, "consistency", f"init_from={first}", "trainer.max_steps=1",
                       "trainer.val_every_n_steps=100", "trainer.deepspeed=null")[2:]]) == 0
    from fvdm.stages.checkpoints import load_teacher

    phase1 = run_root / "consistency_phase1" / "checkpoints" / "last.ckpt"
    original = load_diffusion(guidance_ckpt)[0].state_dict()
    kept = load_teacher(phase1).state_dict()
    assert all(torch.equal(original[k], kept[k]) for k in original)
    out = tmp_path / "meshes"
    image = tmp_path / "white.png"
    Image.fromarray(np.full((48, 48, 3), 255, np.uint8)).save(image)
    assert main(["sample", "--checkpoint", str(phase1), "--image", str(image), "--out", str(out), "--steps", "2",
                 "--resolution", "16", "--device", "cpu"]) == 0
    from fvdm.bench.fewstep import few_step_table

    root = tmp_path / "quickstart"  # the layout fewstep reads: data/ and runs/flow (the original teacher)
    (root / "runs").mkdir(parents=True)
    (root / "data").symlink_to(synth_data)
    (root / "runs" / "flow").symlink_to(flow_run / "flow")
    table = few_step_table(root, {"cfd": first, "phase1": phase1}, steps=(1, 50), resolution=16, max_batches=1)
    assert list(table) == ["teacher", "cfd", "phase1"]
    assert table["teacher"]["iou_50"] == 1.0  # the teacher at the reference's own 50 steps is the reference
    assert all(0 <= row[f"iou_{k}"] <= 1 and row[f"chamfer_{k}"] >= 0 for row in table.values() for k in (1, 50))


# --------------------------------------------------------------------------------------------------------
# adversarial finetuning
# --------------------------------------------------------------------------------------------------------

def test_discriminator_heads_train_and_the_backbone_does_not(synth_data, guidance_ckpt, tmp_path):
    from fvdm.models.discriminator import DiscriminatorConfig, LatentDiscriminator
    from fvdm.stages.adversarial import discriminator_loss

    teacher = load_diffusion(guidance_ckpt)[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    disc = LatentDiscriminator(teacher, DiscriminatorConfig(layers=["double.0", "single.1"], groups=8))
    real, fake = torch.randn(4, 32, 32), torch.randn(4, 32, 32) * 3
    cond = torch.randn(4, 65, 64)
    opt = torch.optim.Adam(disc.heads.parameters(), lr=1e-2)
    fake.requires_grad_(True)
    for _ in range(20):
        loss = discriminator_loss(disc(real, cond, 5.0), disc(fake, cond, 5.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 1.0  # the heads separate the two sets
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # gradients reach the generator's sample
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_adversarial_stage_steps_both_networks_and_chains(synth_data, guidance_ckpt, tmp_path, monkeypatch):
    from fvdm.models.dit import FlowDiT

    run_root = tmp_path / "runs"
    assert main(["train", *args(synth_data, run_root, "consistency", f"init_from={guidance_ckpt}",
                                "grid.phases=1", "trainer.max_steps=1", "trainer.val_every_n_steps=100")]) == 0
    phase1 = run_root / "consistency" / "checkpoints" / "last.ckpt"
    backbone_runs = []
    features = FlowDiT.features
    monkeypatch.setattr(FlowDiT, "features", lambda dit, *a, **k: backbone_runs.append(1) or features(dit, *a, **k))
    assert main(["train", *args(synth_data, run_root, "adversarial", f"init_from={phase1}", "trainer.max_steps=4",
                                "trainer.val_every_n_steps=4", "eval.student_steps=[1]", "eval.steps=2",
                                "discriminator.groups=8")]) == 0
    client, run = run_of(run_root, "adversarial")
    history = {name: [m.value for m in client.get_metric_history(run.info.run_id, name)]
               for name in ("train/loss_d", "train/loss_adv", "train/loss_cf")}
    assert all(len(v) == 4 for v in history.values())  # 4 batches, each a heads step then a generator step
    assert len(backbone_runs) == 2 * 4  # the discriminator's backbone: clean latents, the generator's sample
    assert len(set(history["train/loss_d"])) > 1
    assert "val/student_1step_iou_vs_teacher2" in run.data.metrics
    assert main(["train", *args(synth_data, run_root, "adversarial", f"init_from={phase1}", "trainer.max_steps=6",
                                "trainer.val_every_n_steps=100", "eval.student_steps=[1]", "eval.steps=2",
                                "discriminator.groups=8"), "--resume"]) == 0
    from fvdm.stages.adversarial import D_OPTIMIZER_KEY

    last = torch.load(run_root / "adversarial" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    heads_state = last[D_OPTIMIZER_KEY]["optimizer"]["state"]
    assert all(int(s["step"]) == 6 for s in heads_state.values())  # 4 + 2: the heads' AdamW resumed, not restarted
    from fvdm.stages.checkpoints import load_teacher

    original = load_diffusion(guidance_ckpt)[0].state_dict()
    kept = load_teacher(run_root / "adversarial" / "checkpoints" / "last.ckpt").state_dict()
    assert all(torch.equal(original[k], kept[k]) for k in original)


def test_init_from_names_a_run(flow_run, tmp_path):
    from fvdm.config import ConfigError
    from fvdm.stages.checkpoints import resolve_checkpoint

    run = flow_run / "flow"
    assert resolve_checkpoint(run) == resolve_checkpoint(f"{run}:last") == run / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(f"{run}:best") == run / "checkpoints" / "best.ckpt"  # kept by trainer.monitor
    assert resolve_checkpoint(tmp_path / "model.ckpt") == tmp_path / "model.ckpt"  # anything else as given
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="set trainer.monitor"):
        resolve_checkpoint(f"{tmp_path / 'other'}:best")
    with pytest.raises(ConfigError, match="not a run directory"):
        resolve_checkpoint(f"{tmp_path}:last")


def test_flow_without_a_vae_is_a_config_error(synth_data, tmp_path, capsys):
    assert main(["train", *args(synth_data, tmp_path, "flow", "trainer.max_steps=1")]) == 2
    assert "vae_from" in capsys.readouterr().err

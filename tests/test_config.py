"""Config errors name the key and the source before any work starts; presets are plain config."""
from __future__ import annotations

import pytest

from fvdm.config import ConfigError, load_config, split_args
from fvdm.models.vae import vae_preset
from fvdm.stages.vae import VAEStageConfig
from fvdm.train import resolve


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "stage: vae\ndata:\n  train: a\n  val: b\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*data\.batchsize"):
        resolve([path])


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "stage: vae\ndata:\n  train: a\n  val: b\n")
    with pytest.raises(ConfigError, match=r"command line.*trainer\.max_steps"):
        resolve([path, "trainer.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"run\.yaml.*optim\.lr"):
        resolve([write(tmp_path, "stage: vae\noptim:\n  lr: fast\n")])


def test_missing_required_value(tmp_path):
    path = write(tmp_path, "stage: vae\ndata:\n  train: a\n")
    with pytest.raises(ConfigError, match=r"data\.val"):
        resolve([path])
    with pytest.raises(ConfigError, match="stage"):
        resolve([write(tmp_path, "data:\n  train: a\n", "nostage.yaml")])


def test_unknown_stage_and_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'vea'"):
        resolve([write(tmp_path, "stage: vea\n")])
    with pytest.raises(ConfigError, match="not found"):
        resolve([str(tmp_path / "absent.yaml")])
    with pytest.raises(ConfigError, match="YAML"):
        resolve([write(tmp_path, "stage: [vae\n", "broken.yaml")])


def test_preset_then_files_then_overrides(tmp_path):
    path = write(tmp_path, "stage: vae\nvae_preset: base\nvae:\n  heads: 4\ndata:\n  train: a\n  val: b\n")
    cfg = load_config(VAEStageConfig, *split_args([path, "vae.num_decoder_layers=2"]))
    base = vae_preset("base")
    assert cfg.vae.width == base.width and cfg.vae.num_latents == base.num_latents  # from the preset
    assert cfg.vae.heads == 4 and cfg.vae.num_decoder_layers == 2  # file, then command line
    with pytest.raises(ConfigError, match="vae_preset"):
        load_config(VAEStageConfig, [path], ["vae_preset=huge"])


def test_every_shipped_experiment_resolves():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "experiments"
    for path in sorted(root.glob("*.yaml")):
        tiny = root / "presets" / f"tiny-{path.stem}.yaml"
        args = [str(path)] + ([str(tiny)] if tiny.exists() else []) + ["data.train=x", "data.val=y", "init_from=z"]
        args = [a for a in args if not a.startswith("init_from") or path.stem != "vae"]
        cfg = resolve(args)
        assert path.stem.startswith(cfg.stage)  # consistency_phase1.yaml is a consistency config

"""Typed run configuration: dataclass schemas merged with YAML files and ``key=value`` overrides.

Every run is described by one stage config (a dataclass deriving from :class:`RunConfig`). Sources are
merged in order (schema defaults, then each YAML file, then the command-line dotlist) with OmegaConf in
struct mode, so an unknown key, a wrong type or a missing required value is a :class:`ConfigError` that
names the key and the source before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"  # the shipped stage configs and presets


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key and where it came from."""


@dataclass
class DataConfig:
    """Where shards live and how many points of each kind a training step sees."""

    train: str = MISSING  # local paths, brace pattern or pipe: URL of the training shards
    val: str = MISSING  # validation shards, each sample seen exactly once per evaluation
    batch_size: int = 8
    val_batch_size: int = 4
    num_workers: int = 2
    shuffle_buffer: int = 64
    num_surface: int = 4096  # surface points (+normals) fed to the encoder
    num_sharp: int = 0  # sharp-edge points fed to the encoder (flag channel = 1)
    num_vol: int = 2048  # uniform volume SDF samples per shape and step
    num_near: int = 2048  # near-surface SDF samples per shape and step
    render_index: Optional[int] = None  # condition render: None a random one per draw in training (render 0 in
    #                                     validation); 0 the canonical view of synth shards (fvdm.data.render)
    max_bad_fraction: float = 0.05  # stop with an error when more samples than this are corrupt
    val_max_samples: Optional[int] = None  # cap the validation stream (None: all of it)
    resume: str = "reseed"  # on --resume: reseed (fresh draws, instant) | replay (exact batches, re-reads them)
    seed: int = 0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; device and precision never leak into model code."""

    max_steps: int = 1000
    max_time: Optional[str] = None  # "DD:HH:MM:SS" wall-clock cap (e.g. a SLURM slot); None: steps only
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # a Lightning strategy name (auto, ddp, ...); see ``deepspeed``
    deepspeed: Optional[str] = None  # zero2 | zero3 (experiments/deepspeed/*.json) or a JSON path: DeepSpeed
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = 1.0
    activation_checkpointing: bool = False  # diffusion stages: recompute each DiT block in the backward pass
    compile: bool = False  # diffusion stages: torch.compile each block of every DiT (student, teacher, target)
    val_every_n_steps: int = 500
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500
    monitor: Optional[str] = None  # keep checkpoints/best.ckpt by this metric (e.g. val/gen_v_iou): init_from=RUN:best
    monitor_mode: str = "max"  # max | min
    seed: int = 0
    deterministic: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking; with no ``tracking_uri`` an embedded SQLite store lives under the run root."""

    enabled: bool = True  # false: no logger, so no MLflow import (metrics stay in the trainer and checkpoints)
    tracking_uri: Optional[str] = None
    experiment: str = "fvdm"
    run_name: Optional[str] = None


@dataclass
class RunConfig:
    """What every stage shares. Stages derive from it and add their model/loss/optimizer sections."""

    stage: str = MISSING
    run_root: str = "runs"
    name: str = "run"  # checkpoints go to {run_root}/{name}/
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split CLI arguments into YAML files and ``key=value`` overrides."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def _load_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return cfg


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(schema: type, files: Sequence[str] = (), overrides: Sequence[str] = ()) -> Any:
    """Merge ``files`` then ``overrides`` into ``schema`` and return a typed, validated config object.

    A schema may declare ``PRESETS = {"vae_preset": ("vae", vae_preset)}``: the preset named by that key
    (in any source, else its default) fills the section's defaults before the files are merged, so a
    preset is plain config that any file or override can still change.
    """
    merged = OmegaConf.structured(schema)
    OmegaConf.set_struct(merged, True)
    for key, (section, make) in getattr(schema, "PRESETS", {}).items():
        name = peek_key(files, overrides, key, merged.get(key))
        if name:
            try:
                merged = OmegaConf.merge(merged, {section: OmegaConf.structured(make(name))})
            except (KeyError, ValueError) as e:
                raise ConfigError(f"key '{key}': unknown preset '{name}' ({e})") from e
    sources: list[tuple[str, DictConfig]] = [(f, _load_yaml(f)) for f in files]
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: {_describe(e)}") from e
    sources.append(("command line", dotlist))
    for name, src in sources:
        try:
            merged = OmegaConf.merge(merged, src)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{name}: {_describe(e)}") from e
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        where = ", ".join(files) or "no config file"
        raise ConfigError(f"required value missing for {', '.join(missing)} (set it in {where} or as key=value)")
    return OmegaConf.to_object(merged)


def peek_key(files: Sequence[str], overrides: Sequence[str], key: str, default: Any = None) -> Any:
    """Read one top-level key from the sources before the schema is applied (last source wins)."""
    value = default
    for f in files:
        value = _load_yaml(f).get(key, value)
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            value = v.strip()
    return value


def peek_stage(files: Sequence[str], overrides: Sequence[str]) -> str:
    """Find the ``stage`` key before the schema is known."""
    stage = peek_key(files, overrides, "stage")
    if stage is None:
        raise ConfigError(f"{', '.join(files) or 'command line'}: required key 'stage' missing")
    return str(stage)


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML, saved with every run."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any) -> dict[str, Any]:
    """Flat ``a.b.c -> value`` view used for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "")
    return out

"""Append benchmark records (device, date, commit, figures) to ``benchmarks/results.json``."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

DEFAULT_PATH = Path("benchmarks/results.json")


def device_name() -> str:
    """The GPU's name when one is used, else the CPU model and its core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """``FVDM_COMMIT`` when set (a copied tree's git metadata can lag its files), else git's short HEAD."""
    if os.environ.get("FVDM_COMMIT"):
        return os.environ["FVDM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(bench: str, figures: dict[str, Any], path: str | Path = DEFAULT_PATH, **context: Any) -> dict[str, Any]:
    """Append one record for benchmark ``bench`` and return it."""
    entry = {
        "bench": bench,
        "device": device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        **context,
        "figures": figures,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(entry)
    path.write_text(json.dumps(records, indent=1) + "\n")
    return entry

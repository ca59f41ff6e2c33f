"""Progress bars for the data commands that read well in a terminal and in a SLURM or nohup log."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0  # seconds between updates when stderr is a file: a few lines a minute, not ten a second


def progress(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    """``items`` under a tqdm bar: live in a terminal, an update every ``LOG_INTERVAL_S`` in a log file (each
    update is a carriage-return line there, and at tqdm's default rate a long synth fills the log with them)."""
    interval = 0.1 if sys.stderr.isatty() else LOG_INTERVAL_S
    return iter(tqdm(items, total=total, desc=desc, unit=unit, mininterval=interval, maxinterval=max(10.0, interval)))

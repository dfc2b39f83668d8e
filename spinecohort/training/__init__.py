"""Training recipes for spinecohort's networks (``spinecohort train <network>``)."""
from __future__ import annotations

import time
from pathlib import Path


class ProgressLog:
    """A training run's progress: each message is printed with the time of day and, with a
    ``path``, appended to that file line by line (so a background run can be followed)."""

    def __init__(self, path: str | Path | None = None):
        self._file = open(path, "a", buffering=1) if path else None

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self._file:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None

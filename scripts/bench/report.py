"""Progress lines on stderr and the JSON results file of a benchmark."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def write_results(path: str, payload: dict, started: float) -> None:
    """Write a benchmark's JSON results (with its total run time) and say so on stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump({**payload, "total_s": time.perf_counter() - started}, fh, indent=2)
    log(f"wrote {path} in {time.perf_counter() - started:.0f}s total")

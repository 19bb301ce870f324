"""Wall-clock timing of benchmark steps."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable, *args):
    """`(fn(*args), seconds)`. `fn` must return only when its work is done: wrap a JAX call
    in `jax.block_until_ready` (a PyTorch CPU step is synchronous)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def median_ms(times: list[float]) -> float:
    """The median of `times` (seconds), in milliseconds."""
    return 1e3 * statistics.median(times)

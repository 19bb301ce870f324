"""Wall-clock timing of jitted functions, compile time kept apart."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def block(tree: Any) -> Any:
    """Wait until every array in `tree` is computed."""
    return jax.block_until_ready(tree)


def time_call(fn: Callable, *args) -> tuple[Any, float]:
    """`(fn(*args), seconds)`, waiting for the result."""
    start = time.perf_counter()
    out = block(fn(*args))
    return out, time.perf_counter() - start


def median_time(fn: Callable, *args, repeats: int = 5) -> tuple[float, float]:
    """`(first_call_seconds, median_seconds)`: the first call (compile, if not yet compiled)
    is timed apart from the median of `repeats` further calls."""
    _, first = time_call(fn, *args)
    times = [time_call(fn, *args)[1] for _ in range(repeats)]
    return first, statistics.median(times)

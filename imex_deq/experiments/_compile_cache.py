"""JAX's persistent compilation cache, set up for imex-deq's training programs.

A conv DEQ training step takes 20 s or more to compile on a 2-core CPU; read back from the
cache it loads in a fraction of that (trace and lowering still run). The `imex-deq`
command turns the cache on (`--no-compile-cache` turns it off); scripts and notebooks call
`enable_compile_cache()` themselves, before their first compile.
"""

import os
import sys
from pathlib import Path

from jax import config, monitoring

_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _count_hit(event: str, **_) -> None:
    global _hits
    if event == _CACHE_HIT_EVENT:
        _hits += 1


monitoring.register_event_listener(_count_hit)


def cache_hits() -> int:
    """How many programs this process has read from the persistent cache so far."""
    return _hits


def default_compile_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/imex-deq/xla`, or `~/.cache/imex-deq/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imex-deq" / "xla"


def enable_compile_cache(
    path: str | os.PathLike | None = None,
    *,
    max_size_gib: float = 1.0,
    min_compile_s: float = 1.0,
) -> Path:
    """Keep compiled programs in `path` (default: `default_compile_cache_dir()`) across
    processes; the least recently used are evicted beyond `max_size_gib`. Only programs
    that took at least `min_compile_s` to compile are kept. Call it before the first
    compile. Returns the folder; a folder that cannot be created is a `ValueError`."""
    folder = Path(path) if path is not None else default_compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"compile cache folder {folder} cannot be created: {error}") from error
    if not os.access(folder, os.W_OK):
        raise ValueError(f"compile cache folder {folder} is not writable.")
    config.update("jax_compilation_cache_dir", str(folder))
    config.update("jax_compilation_cache_max_size", int(max_size_gib * 2**30))
    config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return folder


def enable_default_compile_cache() -> Path | None:
    """The command's default: the cache in its default folder, or a warning and no cache
    where that folder cannot be used (a training run does not fail for want of a cache)."""
    try:
        return enable_compile_cache()
    except ValueError as error:
        print(f"imex-deq: warning: {error} Compiling without a cache.", file=sys.stderr)
        return None

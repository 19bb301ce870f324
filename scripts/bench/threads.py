"""Thread count and CPU affinity of a benchmark process, and the line describing the machine.
Imports neither jax nor torch."""

from __future__ import annotations

import os
import platform
import sys


def configure_threads(threads: int | None) -> None:
    """Pin XLA (and this process) to `threads` threads. Must run before jax is imported.

    Sets XLA_FLAGS to "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=N"
    (the recipe from the JAX FAQ) and, since recent XLA CPU runtimes size their thread pool
    from the CPUs the process may use, also restricts the process's CPU affinity to N CPUs.
    Then restarts the script once with transparent huge pages where they help
    (`imex_deq.experiments._hugepages`), as every benchmark's baseline row runs in the same
    process, so ratios stay like for like.
    """
    # PyTorch's OpenMP workers busy-wait between parallel regions by default. Interleaved with
    # XLA's threads in one process (or on a loaded machine) that spinning steals the cores:
    # a 2.6 ms step read 66 ms median on this 2-core box under load. Passive waiting fixes it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        if "jax" in sys.modules:
            raise RuntimeError("configure_threads must run before jax is imported")
        pinned = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        flags = os.environ.get("XLA_FLAGS", "")
        if pinned not in flags:  # a restarted process keeps its flags
            os.environ["XLA_FLAGS"] = f"{flags} {pinned}".strip()
        if hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            if threads < len(cpus):
                os.sched_setaffinity(0, cpus[:threads])
    # Last: it imports imex_deq (and jax), and may restart the script with huge pages for
    # XLA's buffers, as the `imex-deq` command does (IMEX_DEQ_HUGEPAGES=0 opts out).
    from imex_deq.experiments._hugepages import restart_with_huge_pages

    restart_with_huge_pages(sys.argv)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(threads: int | None) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shown = "default (all)" if threads is None else str(threads)
    try:
        load = f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load avg ?"
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({cores} usable), "
        f"threads={shown}, {load} at start, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}"
    )

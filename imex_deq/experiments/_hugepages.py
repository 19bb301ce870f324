"""Transparent huge pages for XLA's per-step buffers (Linux, glibc ≥ 2.35).

XLA CPU allocates its temporary buffers afresh on every call of a compiled function, and
glibc hands large ones back to the kernel when they are freed: every call then page-faults
its buffers in again, 4 KiB at a time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
glibc asks for transparent huge pages (2 MiB) instead. Measured on the 2-core CPU
(`scripts/bench_conv.py --skip-deq --torch`, one thread): the explicit mnist_conv training
step 103.7 → 65.0 ms, the cell's VJP 58.3 → 42.4 ms; an Anderson solve on a conv-sized
state (batch 128) 96 → 38 ms. The tunable is read when a process starts, so the `imex-deq`
command restarts itself once with it set.
"""

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "IMEX_DEQ_HUGEPAGES"
"""Set to 0 to keep the environment as it is."""
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+)", name.strip())
    return (int(match[1]), int(match[2])) if match else None


def _thp_mode() -> str | None:
    try:
        with open(_THP_SETTING) as handle:
            match = re.search(r"\[(\w+)\]", handle.read())
    except OSError:
        return None
    return match[1] if match else None


def huge_pages_environment(
    environ: Mapping[str, str],
    thp_mode: str | None,
    glibc_version: tuple[int, int] | None,
) -> dict[str, str] | None:
    """The environment to restart with, or None when there is nothing to gain: huge pages
    off or unknown, glibc missing or older than 2.35, the tunable already set, or the
    user opted out (`IMEX_DEQ_HUGEPAGES=0`)."""
    if environ.get(OPT_OUT) == "0" or thp_mode not in ("always", "madvise"):
        return None
    if glibc_version is None or glibc_version < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_huge_pages(argv: list[str]) -> None:
    """Replace this process by `python argv...` with huge pages on, if that gains
    anything here (`huge_pages_environment`); otherwise return."""
    environ = huge_pages_environment(os.environ, _thp_mode(), _glibc_version())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv], environ)
    except OSError:  # carry on in this process, with glibc's default pages
        return

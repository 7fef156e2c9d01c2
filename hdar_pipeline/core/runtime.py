"""Reproducibility and resource accounting shared by every method: seeds, threads, the torch device, runtime,
peak memory."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity: what SLURM or a container grants), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configured_threads() -> int:
    """The thread count :func:`configure_threads` set in this process (its ``OMP_NUM_THREADS``), else the usable
    cores: how many threads this process's own thread pools may use."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cpus()


def configure_threads(threads: int | None) -> None:
    """Set thread counts for ITK (ANTs, SimpleITK), OpenMP/BLAS and torch.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` when it starts, and torch's OpenMP ``OMP_NUM_THREADS``
    when it is imported, so call this before the first ITK filter runs; SimpleITK and torch, when this process
    has imported them already, are set directly. Neither is imported here: a process that never uses them
    (the BIDS App's own, whose jobs run in workers) does not pay for the import (torch: about 2 s).
    """
    if not threads:
        return
    n = str(int(threads))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def seed_everything(seed: int | None, *, deterministic: bool = False) -> None:
    """Seed Python, numpy, torch and ANTs (``ANTS_RANDOM_SEED``, read by ANTs at each registration).

    ANTs reads a seed of 0 as "seed from the clock", so ANTs gets :func:`ants_seed` (``seed + 1``):
    every user seed, 0 included, gives a reproducible ANTs run.
    """
    if seed is None:
        return
    os.environ["ANTS_RANDOM_SEED"] = str(ants_seed(seed))
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
        if deterministic:
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def ants_seed(seed: int) -> int:
    """The non-zero ``ANTS_RANDOM_SEED`` used for a user seed (ANTs treats 0 as unseeded)."""
    if seed < 0:
        raise ValueError(f"seeds must be >= 0, got {seed}")
    return int(seed) + 1


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """The torch device a method or training run uses.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` or ``None``: CUDA when available, else the CPU; otherwise ``torch.device(device)``
        (``"cpu"``, ``"cuda"``, ``"cuda:N"``). Torch is imported here, when called, not with this module.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        A CUDA device is requested but CUDA is not available.
    """
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    return dev


@dataclass
class RunInfo:
    """What one registration cost: wall time (s) and peak resident memory (MiB) of this process."""

    runtime_s: float = float("nan")
    peak_memory_mb: float = float("nan")
    extra: dict = field(default_factory=dict)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def measure() -> Iterator[RunInfo]:
    """Time a block and sample this process's resident memory (every 20 ms) for its peak.

    ANTs and ITK allocate outside Python, so the resident set size is sampled rather than traced.
    """
    info = RunInfo()
    peak = [_rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield info
    finally:
        info.runtime_s = time.perf_counter() - start
        stop.set()
        thread.join()
        info.peak_memory_mb = max(peak[0], _rss_mb())

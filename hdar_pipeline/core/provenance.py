"""What produced an output, for JSON sidecars, model cards and benchmark reports: library versions, the git commit,
file hashes (SHA-256) and the machine (CPU model, cores, GPU, host)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("hdar-pipeline", "antspyx", "SimpleITK", "nibabel", "numpy", "scipy", "torch", "fireants")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result (``"not installed"`` if absent)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(*, short: bool = False) -> str:
    """The git commit of the hdar-pipeline source tree (``+dirty`` when tracked files are modified), or
    ``"unknown"`` when the package is not run from a git checkout (an installed wheel) or git cannot tell.

    Parameters
    ----------
    short : bool
        Git's abbreviated hash (``git rev-parse --short``, e.g. ``"60d3d5c"``) instead of the full 40 digits.
    """
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", *(["--short"] if short else []), "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read ``chunk`` bytes at a time)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s first ``model name``), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The CUDA GPUs torch sees, comma-separated; ``""`` without one (or without torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # pragma: no cover
        pass
    return ""


def machine_summary() -> str:
    """The machine in one line: ``"<host> (<CPU model>, <N> cores)"`` (each benchmark result row records it)."""
    return f"{platform.node()} ({cpu_model()}, {os.cpu_count()} cores)"


def machine_description(device: str | None = None) -> list[str]:
    """Lines describing the machine (CPU model, cores, host, GPU), the library versions and the short commit
    (the ``## Machine`` section of benchmark reports). ``device`` is accepted for the callers' signature and
    not used."""
    from hdar_pipeline.core.runtime import usable_cpus

    versions = library_versions()
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores ({usable_cpus()} usable by this process); "
             f"host {platform.node()}, {platform.system()} {platform.release()}"]
    gpu = gpu_name()
    if gpu:
        lines.append(f"GPU: {gpu}")
    lines.append("versions: " + ", ".join(f"{k} {versions[k]}" for k in
                                          ("hdar-pipeline", "torch", "antspyx", "SimpleITK", "numpy", "python")
                                          if k in versions))
    lines.append(f"commit: {git_commit(short=True)}")
    return lines


def hardware_description(device: Any) -> dict[str, Any]:
    """The machine a model trained on, for model cards and training logs.

    Parameters
    ----------
    device : torch.device
        The device it ran on.

    Returns
    -------
    dict
        ``device``, ``cpu`` (model name), ``cpu_count``, ``torch_threads``, ``gpu`` (the device's name, on
        CUDA only) and ``load_average`` (1, 5, 15 minutes, rounded to 0.01; where the system has one).
    """
    import torch

    out: dict[str, Any] = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    try:
        out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return out


def json_default(value):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, paths, tuples and sets as
    plain JSON values; anything else as its ``str``."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (tuple, set, np.ndarray)):
        return list(value.tolist() if isinstance(value, np.ndarray) else value)
    return str(value)

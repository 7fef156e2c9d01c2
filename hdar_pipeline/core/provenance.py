"""What produced an output: library versions and file hashes, for JSON sidecars."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

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
    ``"unknown"`` when the package is not run from a git checkout (an installed wheel) or git cannot tell."""
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


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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

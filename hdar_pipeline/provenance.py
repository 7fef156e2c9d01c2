"""What produced an output: library versions and file hashes, for JSON sidecars."""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

_PACKAGES = ("hdar-pipeline", "antspyx", "SimpleITK", "nibabel", "numpy", "scipy", "torch")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result (``"not installed"`` if absent)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


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

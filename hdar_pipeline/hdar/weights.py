"""Shipped HDAR weights: a ``.pt`` file and its ``.json`` model card, verified before loading.

Layout
------
Weights live in ``hdar_pipeline/hdar/weights/`` (installed as package data) as ``<name>.pt`` plus
``<name>.json``. ``name="default"`` is what :class:`~hdar_pipeline.methods.hdar_method.HDARMethod` loads
unless told otherwise; a path to a ``.pt`` (or its ``.json``) outside the package works the same way.

``<name>.pt`` holds only tensors and plain values (loadable with ``torch.load(weights_only=True)``)::

    {"format": "hdar-weights/1", "config": CascadeConfig.to_dict(), "state_dict": {...}}

The network is HDAR's cascade or, with ``config.network == "voxelmorph"``, VoxelMorph's U-Net as its only level
(:mod:`hdar_pipeline.hdar.voxelmorph_net`); :func:`card_network` reads which from the card. Shipped VoxelMorph weights
are named ``voxelmorph`` (:class:`~hdar_pipeline.methods.voxelmorph_method.VoxelMorphMethod` loads them).

``<name>.json`` is the model card::

    format, name, sha256 (of the .pt bytes), created (UTC), data (what it was trained on), command
    (the exact command line), seed, commit (git commit of hdar-pipeline, "+dirty" if modified),
    hardware (device, CPU, threads), training_time_s, steps, validation (scores on held-out pairs),
    config ({"cascade": ..., "training": ...}), parameters, versions

Loading never touches the network: the files are read from disk, the SHA-256 of the ``.pt`` is
compared with the card's, and only then is the file unpickled (``weights_only=True``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdar_pipeline.core.provenance import sha256

if TYPE_CHECKING:  # torch and the network are imported where weights are loaded or saved: resolving, hashing
    import torch   # and reading cards (a workflow's cache keys) do not pay for them

    from hdar_pipeline.hdar.cascade import CascadeConfig, HDARCascade

PathLike = str | os.PathLike

#: Where shipped weights live.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FORMAT = "hdar-weights/1"


class WeightsError(ValueError):
    """Weights cannot be used: missing card, hash mismatch, unreadable or incompatible file."""


class NoWeightsError(WeightsError):
    """The requested weights do not exist (e.g. none are shipped in this version)."""


@dataclass
class LoadedWeights:
    """A loaded, verified model and its provenance.

    Attributes
    ----------
    model : HDARCascade
        In eval mode, on the requested device.
    card : dict
        The model card (``<name>.json``).
    sha256 : str
        Hex SHA-256 of the ``.pt`` file (verified equal to the card's).
    path, card_path : Path
    """

    model: HDARCascade
    card: dict[str, Any]
    sha256: str
    path: Path
    card_path: Path

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.stem))


def available_weights(directory: PathLike | None = None) -> list[str]:
    """Names of the weights in ``directory`` (default :data:`WEIGHTS_DIR`) that have both a ``.pt`` and a
    ``.json``."""
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.pt") if p.with_suffix(".json").is_file())


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".json")) or value.startswith(".")


def resolve_weights(weights: PathLike = "default") -> tuple[Path, Path]:
    """The ``(.pt, .json)`` paths for a shipped name or a file path; both must exist.

    Raises
    ------
    NoWeightsError
        With a message that says how to get weights.
    """
    value = os.fspath(weights)
    if _looks_like_path(value) or Path(value).exists():
        path = Path(value).expanduser()
        if path.is_dir():
            path = path / "default.pt"
        pt = path.with_suffix(".pt") if path.suffix == ".json" else path
        card = pt.with_suffix(".json")
        if not pt.is_file():
            raise NoWeightsError(f"HDAR weights file not found: {pt}")
        if not card.is_file():
            raise WeightsError(f"{pt}: its model card {card.name} is missing beside it; the card holds the "
                               "SHA-256 that is checked before loading (write both with save_weights / "
                               "`hdar train --export`)")
        return pt, card
    pt, card = WEIGHTS_DIR / f"{value}.pt", WEIGHTS_DIR / f"{value}.json"
    if not pt.is_file():
        shipped = available_weights()
        if not shipped:
            raise NoWeightsError(
                "no trained HDAR weights are shipped in this version; train with `hdar train` (e.g. "
                "`hdar train --folder DIR -o RUN --export NAME`) and load the exported RUN/NAME.pt with "
                "HDARMethod(weights=PATH), or register with --method syn or demons")
        raise NoWeightsError(f"no shipped HDAR weights named {value!r}; shipped: {', '.join(shipped)}")
    if not card.is_file():
        raise WeightsError(f"{pt}: its model card {card.name} is missing")
    return pt, card


def weights_identity(weights: PathLike = "default") -> str:
    """``"<name>@sha256:<hex>"`` of the weights ``weights`` resolves to (the SHA-256 of the ``.pt`` bytes), or
    ``""`` when there are none. Workflows put it among a registration task's inputs, so a cache made with
    other weights is not reused."""
    try:
        pt, _ = resolve_weights(weights)
    except WeightsError:
        return ""
    return f"{pt.stem}@sha256:{sha256(pt)}"


def read_card(path: PathLike) -> dict[str, Any]:
    """The model card as a dict (``path``: the ``.json`` or its ``.pt``)."""
    p = Path(path)
    p = p.with_suffix(".json") if p.suffix == ".pt" else p
    try:
        card = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{p}: model card cannot be read ({exc})") from None
    if not isinstance(card, dict) or "sha256" not in card:
        raise WeightsError(f"{p}: not an HDAR model card (no sha256 field)")
    return card


def card_network(card: dict[str, Any]) -> str:
    """The S1 network a model card's weights hold: ``config.cascade.network`` (``"hdar"`` or ``"voxelmorph"``);
    ``"hdar"`` for cards written before the setting existed."""
    config = card.get("config") if isinstance(card.get("config"), dict) else {}
    cascade = config.get("cascade") if isinstance(config.get("cascade"), dict) else {}
    return str(cascade.get("network") or "hdar")


def verify_weights(pt: PathLike, card: dict[str, Any] | PathLike) -> str:
    """Check the ``.pt`` file's SHA-256 against the card; return it.

    Raises
    ------
    WeightsError
        When the hashes differ (the file is corrupt, truncated or was modified).
    """
    card_dict = card if isinstance(card, dict) else read_card(card)
    actual = sha256(pt)
    expected = str(card_dict["sha256"]).lower()
    if actual != expected:
        raise WeightsError(f"{pt}: SHA-256 mismatch (model card says {expected}, the file has {actual}); the "
                           "weights file is corrupt or was modified: re-install the package or re-export them")
    return actual


def load_weights(name: PathLike = "default", device: str | torch.device = "cpu", **overrides: Any) -> LoadedWeights:
    """Load verified HDAR weights.

    Parameters
    ----------
    name : str or path
        A shipped name (``"default"``) or the path of a ``.pt`` (with its ``.json`` beside it).
    device : str or torch.device
    **overrides
        Inference-only cascade settings (``mode``, ``top_k``, ...), see
        :meth:`HDARCascade.from_checkpoint`.

    Returns
    -------
    LoadedWeights

    Raises
    ------
    NoWeightsError, WeightsError
    """
    pt, card_path = resolve_weights(name)
    card = read_card(card_path)
    sha = verify_weights(pt, card)
    import torch

    try:
        payload = torch.load(pt, map_location=device, weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{pt}: cannot be loaded as HDAR weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{pt}: not an HDAR weights file (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
                           f"expected {WEIGHTS_FORMAT})")
    try:
        from hdar_pipeline.hdar.cascade import HDARCascade

        model = HDARCascade.from_checkpoint({"config": payload["config"], "state_dict": payload["state_dict"]},
                                            **overrides)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise WeightsError(f"{pt}: weights do not fit the HDAR cascade ({exc})") from None
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedWeights(model, card, sha, pt, card_path)


def save_weights(model: HDARCascade, config: CascadeConfig | dict[str, Any] | None, card: dict[str, Any],
                 path: PathLike) -> tuple[Path, Path]:
    """Write ``<path>.pt`` (config + state dict, float32, on the CPU) and its model card ``<path>.json``.

    Parameters
    ----------
    model : HDARCascade
    config : CascadeConfig or dict, optional
        The cascade configuration to store (default ``model.config``).
    card : dict
        Model-card fields (data, command, seed, commit, hardware, training_time_s, validation, config, ...);
        ``format``, ``name``, ``sha256``, ``created`` and ``parameters`` are filled in here.
    path : path
        Destination ``.pt`` (or a stem; ``.pt`` is added).

    Returns
    -------
    (pt_path, card_path)
    """
    pt = Path(path)
    if pt.suffix != ".pt":
        pt = pt.with_name(pt.name + ".pt")
    pt.parent.mkdir(parents=True, exist_ok=True)
    import torch

    from hdar_pipeline.hdar.cascade import CascadeConfig

    cfg = config.to_dict() if isinstance(config, CascadeConfig) else dict(config or model.config.to_dict())
    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).clone()
             for k, v in model.state_dict().items()}
    tmp = pt.with_name(pt.name + ".tmp")
    torch.save({"format": WEIGHTS_FORMAT, "config": cfg, "state_dict": state}, tmp)
    os.replace(tmp, pt)
    full = dict(card)
    full.update({
        "format": WEIGHTS_FORMAT,
        "name": full.get("name", pt.stem),
        "file": pt.name,
        "sha256": sha256(pt),
        "size_bytes": pt.stat().st_size,
        "created": full.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": model.parameter_counts(),
    })
    cfgs = full.get("config") if isinstance(full.get("config"), dict) else {}
    full["config"] = {**cfgs, "cascade": cfg}
    card_path = pt.with_suffix(".json")
    card_path.write_text(json.dumps(full, indent=2, default=str) + "\n")
    return pt, card_path

"""Stage-wise training of the HDAR cascade (the paper's schedule), with validation, checkpoints and a log.

Schedule
--------
Stage 1 trains S1 alone; stage 2 trains S2 with S1 frozen; stage 3 trains S3 with S1 and S2 frozen
(``steps_per_stage`` steps each; only the first ``levels`` stages run). A new Adam optimiser
(lr 1e-4, the paper's) starts at each stage; batch size 1. Patch levels train on the patches the
frozen levels select (``train_mode="fast"``: the K hardest, as in the paper), so each sub-network sees
the regions it will refine at inference.

Loss of one pair (fields ``(1, 3, X, Y, Z)`` in voxels of the grid the loss is computed on)::

    L = -localNCC_9(F, M o phi) + smooth_weight * R(u) [+ dice_weight * (1 - softDice(L_M o phi, L_F))]

with ``R`` the anti-folding smoothness (:func:`~hdar_pipeline.hdar.losses.anti_folding_loss`, weight
1.5) or diffusion, and the Dice term only where both subjects have labels (on a random subset of at most
``max_dice_labels`` labels per step, to bound memory; one-hot maps warped trilinearly).

VoxelMorph (``network="voxelmorph"``: VoxelMorph's U-Net as the only level) trains through the same loop, data,
augmentation, validation, checkpoints and export; only its loss defaults differ, to the paper's: ``R`` is the
diffusion term (mean squared gradient) with weight 1, computed on the velocity field before integration in the
diffeomorphic variant (:data:`NETWORK_DEFAULTS`), and the Dice term is the semi-supervised variant's auxiliary
segmentation loss.

Where the loss is computed (``loss_resolution``): ``"level"`` (default) evaluates each stage at the
resolution its network works at: S1 on its own input grid (1/4; the inputs are cached down-sampled
copies, so a stage-1 step never touches the full-resolution volume), S2 on the volume at 1/2, S3 at
full resolution on the bounding box of its patches. ``"full"`` evaluates every stage on the whole
full-resolution volume; on LPBA40-sized volumes that costs about a minute per step on a loaded 2-core CPU
(the local NCC and its backward pass dominate) against about a second at stage 1 with ``"level"``.

Bookkeeping
-----------
``OUTDIR/train_log.csv``
    One row per step: ``step, stage, stage_step, loss, loss_ncc, loss_smooth, loss_dice, lr,
    step_seconds, elapsed_s`` and, on validation steps, ``val_dice`` (mean Dice over the labels of
    held-out pairs, labels warped with nearest neighbour), ``val_ncc`` (mean local NCC, higher is
    better), ``val_folded_percent``; ``elapsed_s`` counts wall time across resumes.
``OUTDIR/checkpoints/step-NNNNNNN.pt`` and ``last.pt``
    Model, optimiser (and AMP scaler) state, step, stage, elapsed time, RNG states (numpy sampler,
    torch, CUDA, Python), both configurations and the validation history; written every
    ``checkpoint_every`` steps, at the end of every stage and at the end. Resuming restores all of it,
    so an interrupted run continues exactly as the uninterrupted one would have (same device and
    threads).
``OUTDIR/train_config.json``
    The configuration and the data it ran on.

Mixed precision (``torch.autocast``, bf16 where supported, else fp16 with a gradient scaler) is used on
CUDA only; losses are always computed in float32.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from hdar_pipeline.core.runtime import configure_threads, resolve_device, seed_everything
from hdar_pipeline.hdar.cascade import CascadeConfig, HDARCascade, build_cascade
from hdar_pipeline.hdar.data import Pair, PairDataset
from hdar_pipeline.hdar.layers import SpatialTransformer, resize_flow, resize_volume, sample_region
from hdar_pipeline.hdar.losses import anti_folding_loss, diffusion_loss, jacobian_determinant, local_ncc_loss, one_hot, soft_dice_loss

PathLike = str | os.PathLike

CHECKPOINT_FORMAT = "hdar-train-checkpoint/1"
LOG_COLUMNS = ["step", "stage", "stage_step", "loss", "loss_ncc", "loss_smooth", "loss_dice", "lr",
               "step_seconds", "elapsed_s", "val_dice", "val_ncc", "val_folded_percent"]
#: Settings that may change when a run is resumed (schedule and bookkeeping, not the model or the loss).
RESUMABLE_CHANGES = {"steps_per_stage", "val_every", "val_pairs", "checkpoint_every", "keep_checkpoints"}

#: Per S1 network, the defaults of :class:`TrainConfig`'s network-dependent settings: HDAR's (anti-folding
#: smoothness, weight 1.5, on the displacement) and VoxelMorph's (diffusion, weight 1 for local NCC as
#: Balakrishnan et al. 2019 found best, on the velocity before integration in the diffeomorphic variant).
NETWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "hdar": {"width": "small", "levels": 3, "smoothness": "anti_folding", "smooth_weight": 1.5,
             "smooth_on_velocity": False},
    "voxelmorph": {"width": "vm2", "levels": 1, "smoothness": "diffusion", "smooth_weight": 1.0,
                   "smooth_on_velocity": True},
}
#: What a saved training configuration without a setting (written before the setting existed) meant.
LEGACY_SETTINGS = {"network": "hdar", "smooth_on": "displacement"}


@dataclass
class TrainConfig:
    """Training settings.

    Attributes
    ----------
    network : "hdar" or "voxelmorph"
        The S1 network (:class:`~hdar_pipeline.hdar.cascade.CascadeConfig`); it sets the defaults of ``width``,
        ``levels`` and the smoothness term (:data:`NETWORK_DEFAULTS`). Configurations without it are ``"hdar"``.
    width : "small", "paper" or 4 ints (HDAR); "vm2" or "vm1" (VoxelMorph)
        Default: the network's (``"small"``, ``"vm2"``).
    levels : 1, 2 or 3
        Default: 3 for HDAR, 1 (the only choice) for VoxelMorph.
    diffeomorphic : bool
        Predict stationary velocities (scaling and squaring).
    steps_per_stage : int or up to 3 ints
        Optimiser steps of stage 1, 2, 3 (one value: the same for every stage).
    lr : float
        Adam learning rate (paper: 1e-4).
    smooth_weight : float, optional
        Weight of the smoothness term. Default: the network's paper's, 1.5 for HDAR, 1 for VoxelMorph with local
        NCC (Balakrishnan et al. 2019).
    smoothness : "anti_folding" or "diffusion", optional
        Default: the network's paper's, HDAR's anti-folding term or VoxelMorph's diffusion (mean squared
        gradient, ``Grad('l2')``).
    smooth_on : "displacement" or "velocity", optional
        The field the smoothness term is computed on. Default: the network's: the displacement for HDAR, the
        stationary velocity before integration for a diffeomorphic VoxelMorph (its ``preint_flow``; the
        displacement without ``diffeomorphic``). ``"velocity"`` needs ``diffeomorphic``, ``levels=1`` and
        ``loss_resolution="level"`` (the velocity lives on S1's own grid).
    dice_weight : float
        Weight of the soft Dice term on pairs with labels (0 disables it).
    max_dice_labels : int
        Labels (besides background) drawn per step for the Dice term.
    ncc_window : int
        Local NCC window (voxels of the loss grid, paper: 9).
    loss_resolution : "level" or "full"
        Where the loss is computed: at the resolution of the level being trained (S1 on its 1/4 input
        grid, S2 at 1/2, S3 at full resolution on its patches' bounding box; each network's own input
        resolution, and 10-50x cheaper on the CPU) or on the whole volume at full resolution.
    augment : {"none", "geometry", "intensity", "all"} or bool
        ``"geometry"``: the paper's random flips and axis permutations of the pair; ``"intensity"``: an
        independent random acquisition change per image (blur, bias field, gamma, noise;
        :class:`~hdar_pipeline.hdar.data.IntensityAugmentation`); ``"all"``: both. ``True``/``False`` are the
        historical ``"geometry"``/``"none"``.
    train_mode : "fast" or "full"
        How S2/S3 patches are chosen while training (paper: the K hardest, "fast").
    train_top_k : int, optional
        Patches per level in a training step (default: the cascade's ``top_k``, the paper's K = 8). Fewer
        patches make a patch-level step proportionally cheaper on a CPU; validation and inference keep
        ``top_k``. The ranking still picks the hardest ones, so the network sees the hardest regions.
    val_every, val_pairs : int
        Validate every ``val_every`` steps (and at the end of each stage) on ``val_pairs`` held-out pairs.
    checkpoint_every, keep_checkpoints : int
        Checkpoint cadence, and how many ``step-*.pt`` files to keep (``last.pt`` is always kept).
    seed : int
        Seeds the initial weights, the pair sampler and the augmentation.
    amp : "auto", "bf16", "fp16" or "off"
        Mixed precision on CUDA ("auto": bf16 where supported, else fp16); ignored on the CPU.
    cascade : dict
        Other :class:`CascadeConfig` settings (patch sizes, ``top_k``, ``s1_scale``, ...).
    """

    width: str | tuple[int, int, int, int] | None = None
    levels: int | None = None
    diffeomorphic: bool = False
    steps_per_stage: int | tuple[int, ...] = 2000
    lr: float = 1e-4
    smooth_weight: float | None = None
    smoothness: Literal["anti_folding", "diffusion"] | None = None
    dice_weight: float = 1.0
    max_dice_labels: int = 16
    ncc_window: int = 9
    loss_resolution: Literal["level", "full"] = "level"
    augment: str | bool = "intensity"
    train_mode: Literal["fast", "full"] = "fast"
    train_top_k: int | None = None
    val_every: int = 250
    val_pairs: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    cascade: dict[str, Any] = field(default_factory=dict)
    network: Literal["hdar", "voxelmorph"] = "hdar"
    smooth_on: Literal["displacement", "velocity"] | None = None

    def __post_init__(self) -> None:
        if self.network not in NETWORK_DEFAULTS:
            raise ValueError(f"network must be one of {', '.join(NETWORK_DEFAULTS)}, got {self.network!r}")
        defaults = NETWORK_DEFAULTS[self.network]
        if self.levels is None:
            self.levels = defaults["levels"]
        if self.width is None:
            self.width = defaults["width"]
        if self.smoothness is None:
            self.smoothness = defaults["smoothness"]
        if self.smooth_weight is None:
            self.smooth_weight = defaults["smooth_weight"]
        self.smooth_weight = float(self.smooth_weight)
        if self.smooth_on is None:
            self.smooth_on = "velocity" if defaults["smooth_on_velocity"] and self.diffeomorphic else "displacement"
        if self.smooth_on not in ("displacement", "velocity"):
            raise ValueError(f"smooth_on must be 'displacement' or 'velocity', got {self.smooth_on!r}")
        if self.levels not in (1, 2, 3):
            raise ValueError(f"levels must be 1, 2 or 3, got {self.levels}")
        if isinstance(self.steps_per_stage, int):
            self.steps_per_stage = (int(self.steps_per_stage),) * 3
        steps = tuple(int(s) for s in self.steps_per_stage)
        if len(steps) == 1:
            steps = steps * 3
        if len(steps) < self.levels or any(s < 0 for s in steps):
            raise ValueError(f"steps_per_stage needs {self.levels} non-negative values, got {steps}")
        self.steps_per_stage = steps
        if not isinstance(self.width, str):
            self.width = tuple(int(v) for v in self.width)  # type: ignore[assignment]
        if self.smoothness not in ("anti_folding", "diffusion"):
            raise ValueError(f"smoothness must be 'anti_folding' or 'diffusion', got {self.smoothness!r}")
        if self.loss_resolution not in ("level", "full"):
            raise ValueError(f"loss_resolution must be 'level' or 'full', got {self.loss_resolution!r}")
        if self.smooth_on == "velocity" and not (self.diffeomorphic and self.levels == 1
                                                 and self.loss_resolution == "level"):
            raise ValueError("smooth_on='velocity' (the smoothness term on the network's velocity field) needs "
                             "diffeomorphic=True, levels=1 and loss_resolution='level' (to train at full "
                             "resolution, set cascade s1_scale=1)")
        if self.train_top_k is not None and int(self.train_top_k) < 1:
            raise ValueError(f"train_top_k must be >= 1, got {self.train_top_k}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.cascade = dict(self.cascade)
        CascadeConfig.from_dict(self.cascade_settings())  # validate early (unknown names, values)

    @property
    def stage_steps(self) -> tuple[int, ...]:
        """Steps of the stages that run (``levels`` of them)."""
        return tuple(self.steps_per_stage)[: self.levels]  # type: ignore[arg-type]

    @property
    def total_steps(self) -> int:
        return int(sum(self.stage_steps))

    def stage_of(self, step: int) -> int:
        """Stage (1-based) of global step ``step`` (1-based)."""
        end = 0
        for stage, n in enumerate(self.stage_steps, start=1):
            end += n
            if step <= end:
                return stage
        return self.levels

    def stage_end(self, stage: int) -> int:
        return int(sum(self.stage_steps[:stage]))

    def cascade_settings(self) -> dict[str, Any]:
        return {**self.cascade, "width": self.width, "levels": self.levels, "diffeomorphic": self.diffeomorphic,
                "network": self.network}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes
    ----------
    model : HDARCascade
        The trained cascade (eval mode, on ``device``).
    config : TrainConfig
    out_dir, log_path, checkpoint_path : Path
    step : int
        Steps done (``config.total_steps`` unless stopped early with ``max_steps``).
    elapsed_s : float
        Wall time across resumes (training, validation, checkpoints).
    train_seconds : float
        Time spent in optimiser steps only.
    device : str
    validation : list of dict
        ``{"step", "stage", "val_dice", "val_ncc", "val_folded_percent"}`` per validation.
    completed : bool
        Whether every stage finished.
    """

    model: HDARCascade
    config: TrainConfig
    out_dir: Path
    log_path: Path
    checkpoint_path: Path | None
    step: int
    elapsed_s: float
    train_seconds: float
    device: str
    validation: list[dict[str, Any]]
    completed: bool

    @property
    def final_validation(self) -> dict[str, Any] | None:
        return self.validation[-1] if self.validation else None


# ------------------------------------------------------------------------------------------- devices


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``device`` (None: full precision). CPU training always runs in float32."""
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# ------------------------------------------------------------------------------------------- one step


def set_stage(model: HDARCascade, stage: int) -> list[torch.nn.Parameter]:
    """Make only sub-network ``stage`` trainable; return its parameters."""
    for index, net in enumerate(model.nets):
        for p in net.parameters():
            p.requires_grad_(index == stage - 1)
    return list(model.nets[stage - 1].parameters())


def level_loss_size(config: CascadeConfig, stage: int, shape: Sequence[int]) -> tuple[int, int, int]:
    """Grid of the level-resolution loss of ``stage`` for a volume of ``shape``: S1's input size; for S2/S3
    the volume scaled by their ``input / patch`` ratio (1/2 and 1 with the paper's sizes)."""
    if stage == 1:
        return tuple(int(n) for n in config.s1_size(shape))  # type: ignore[return-value]
    scale = [i / p for i, p in zip(config.input_size(stage), config.patch_size(stage))]
    return tuple(max(4, int(round(n * s))) for n, s in zip(shape, scale))  # type: ignore[return-value]


class LowResCache:
    """Down-sampled (antialiased, :func:`~hdar_pipeline.hdar.layers.resize_volume`) training images, per
    subject and size, computed once. Flips and axis permutations commute with this resizing, so the
    augmented low-resolution image is ``augmentation.apply(cached)``."""

    def __init__(self, data: PairDataset) -> None:
        self.data = data
        self.store: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

    def get(self, index: int, size: Sequence[int]) -> np.ndarray:
        key = (int(index), tuple(int(v) for v in size))
        if key not in self.store:
            img = torch.from_numpy(self.data.volumes[index].image)[None, None]
            self.store[key] = resize_volume(img, key[1])[0, 0].numpy().copy()
        return self.store[key]

    def augmented(self, index: int, size: Sequence[int], augmentation: Any, device: torch.device,
                  role: int | None = None) -> torch.Tensor:
        """The cached image ``index`` at ``size`` (un-augmented orientation), augmented (``role``: 0 fixed,
        1 moving, for the intensity change), as ``(1, 1, ...)``."""
        out = augmentation.apply(self.get(index, size), role, self.data.shape)
        return torch.from_numpy(out)[None, None].to(device)


def _union_box(patches: Sequence[Any], shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not patches:
        return None
    lo = [max(0, min(p.start[a] for p in patches)) for a in range(3)]
    hi = [min(int(shape[a]), max(p.stop[a] for p in patches)) for a in range(3)]
    return tuple(lo), tuple(hi)


def pair_loss(model: HDARCascade, pair: Pair, stage: int, config: TrainConfig, device: torch.device,
              rng: np.random.Generator, autocast_dtype: torch.dtype | None = None,
              lowres: LowResCache | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one pair through the first ``stage`` levels; returns ``(loss, terms)``.

    ``config.loss_resolution == "full"``: on the whole volume at full resolution. ``"level"``: at the
    resolution the trained level works at (:func:`level_loss_size`): S1 on its own input grid (its
    raw output, no upsampling), S2 on the volume at 1/2 (the cascade's full-resolution field resized), S3
    at full resolution on the bounding box of its patches (the only place it changes the field).
    Label maps follow with nearest-neighbour (``nearest-exact``) resizing.

    ``terms`` holds floats ``loss``, ``loss_ncc``, ``loss_smooth``, ``loss_dice`` (nan without labels).
    """
    f = pair.fixed.to(device, non_blocking=True)
    m = pair.moving.to(device, non_blocking=True)
    shape = tuple(f.shape[2:])
    fl = pair.fixed_labels.to(device) if pair.has_labels else None  # type: ignore[union-attr]
    ml = pair.moving_labels.to(device) if pair.has_labels else None  # type: ignore[union-attr]
    cfg = model.config
    level = config.loss_resolution == "level"
    size = level_loss_size(cfg, stage, shape) if level else shape
    box = None
    velocity = None
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        # stage 1 takes this path even when S1's grid is the full grid (s1_scale 1): its raw output is needed for
        # a smoothness term on the velocity
        if level and (size != shape or stage == 1):
            fi, mi = pair.indices
            aug = pair.augmentation
            base = level_loss_size(cfg, stage, lowres.data.shape) if lowres is not None else None
            if lowres is not None and base is not None and tuple(base[a] for a in aug.permutation) == size:
                f_t, m_t = lowres.augmented(fi, base, aug, device, 0), lowres.augmented(mi, base, aug, device, 1)
            else:
                f_t, m_t = resize_volume(f, size), resize_volume(m, size)
            if stage == 1:
                out, _ = model.s1_output(f_t, m_t)
                flow = model.integrate(out) if cfg.diffeomorphic else out
                if config.smooth_on == "velocity":
                    velocity = out
            else:
                s1_inputs = None
                if lowres is not None:  # S1's inputs from the cache too (saves two full-volume resizes)
                    s1_base = cfg.s1_size(lowres.data.shape)
                    s1_inputs = (lowres.augmented(fi, s1_base, aug, device, 0),
                                 lowres.augmented(mi, s1_base, aug, device, 1))
                flow = resize_flow(model(f, m, levels=stage, mode=config.train_mode, top_k=config.train_top_k,
                                         s1_inputs=s1_inputs).flow.float(), size)
            if fl is not None:
                fl = torch.nn.functional.interpolate(fl.float(), size=size, mode="nearest-exact").long()
                ml = torch.nn.functional.interpolate(ml.float(), size=size, mode="nearest-exact").long()  # type: ignore[union-attr]
        else:
            result = model(f, m, levels=stage, mode=config.train_mode, top_k=config.train_top_k)
            flow, f_t, m_t = result.flow, f, m
            if level and stage > 1:
                box = _union_box(result.patches(stage), shape)
    flow = flow.float()
    start = (0, 0, 0)
    if box is not None:
        (x0, y0, z0), (x1, y1, z1) = box
        start = (x0, y0, z0)
        flow = flow[:, :, x0:x1, y0:y1, z0:z1]
        f_t = f_t[:, :, x0:x1, y0:y1, z0:z1]
        if fl is not None:
            fl = fl[:, :, x0:x1, y0:y1, z0:z1]
    ncc = local_ncc_loss(f_t, sample_region(m_t, flow, start), config.ncc_window)
    regularised = flow if velocity is None else velocity.float()
    smooth = anti_folding_loss(regularised) if config.smoothness == "anti_folding" else diffusion_loss(regularised)
    loss = ncc + config.smooth_weight * smooth
    dice_value = float("nan")
    if config.dice_weight > 0 and fl is not None and ml is not None:
        counts = torch.bincount(torch.cat([fl.flatten(), ml.flatten()]))
        present = torch.nonzero(counts[1:]).flatten().cpu().numpy() + 1  # labels in either map, background aside
        if present.size:
            if present.size > config.max_dice_labels:
                present = np.sort(rng.choice(present, size=config.max_dice_labels, replace=False))
            values = [0] + [int(v) for v in present]
            warped = sample_region(one_hot(ml, values), flow, start)
            dice = soft_dice_loss(warped, one_hot(fl, values))
            loss = loss + config.dice_weight * dice
            dice_value = float(dice.detach())
    terms = {"loss": float(loss.detach()), "loss_ncc": float(ncc.detach()), "loss_smooth": float(smooth.detach()),
             "loss_dice": dice_value}
    return loss, terms


# ------------------------------------------------------------------------------------------- validation


def label_dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    """Mean Dice over the non-zero labels of ``fixed`` or ``warped`` (integer maps, any equal shape)."""
    values = torch.unique(torch.cat([fixed.unique(), warped.unique()]))
    scores = []
    for v in values.tolist():
        if v == 0:
            continue
        a, b = fixed == v, warped == v
        denom = int(a.sum()) + int(b.sum())
        if denom:
            scores.append(2.0 * int((a & b).sum()) / denom)
    return float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def validate(model: HDARCascade, data: PairDataset, pairs: Sequence[tuple[int, int]], *, stage: int | None = None,
             mode: str | None = None, device: torch.device | str = "cpu", window: int = 9) -> dict[str, float]:
    """Mean label Dice (nearest-neighbour label warping), mean local NCC and folded-voxel percentage of
    the cascade (first ``stage`` levels) over ``pairs`` of ``data``. Dice is nan without labels."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    nearest, linear = SpatialTransformer("nearest"), SpatialTransformer("bilinear")
    dices, nccs, folds = [], [], []
    for i, j in pairs:
        pair = data.pair(i, j)
        f, m = pair.fixed.to(device), pair.moving.to(device)
        flow = model(f, m, levels=stage, mode=mode).flow.float()
        nccs.append(-float(local_ncc_loss(f, linear(m, flow), window)))
        folds.append(100.0 * float((jacobian_determinant(flow) <= 0).float().mean()))
        if pair.has_labels:
            warped = nearest(pair.moving_labels.to(device).float(), flow).round().long()  # type: ignore[union-attr]
            dices.append(label_dice(pair.fixed_labels.to(device), warped))  # type: ignore[union-attr]
    model.train(was_training)
    finite = [d for d in dices if np.isfinite(d)]
    return {"val_dice": float(np.mean(finite)) if finite else float("nan"),
            "val_ncc": float(np.mean(nccs)) if nccs else float("nan"),
            "val_folded_percent": float(np.mean(folds)) if folds else float("nan")}


# ------------------------------------------------------------------------------------------- checkpoints


def _rng_states(rng: np.random.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
                              "python": random.getstate(), "numpy_global": _np_global_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _np_global_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _restore_rng(states: dict[str, Any], rng: np.random.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"].cpu())
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    g = states.get("numpy_global")
    if g is not None:
        np.random.set_state((g["name"], g["keys"].numpy().astype(np.uint32), g["pos"], g["has_gauss"], g["cached"]))
    if "cuda" in states and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
        except RuntimeError:  # a different number of GPUs
            pass


def save_checkpoint(path: PathLike, *, model: HDARCascade, config: TrainConfig, optimizer: torch.optim.Optimizer | None,
                    scaler: Any | None, step: int, stage: int, elapsed_s: float, train_seconds: float,
                    rng: np.random.Generator, validation: list[dict[str, Any]]) -> Path:
    """Write a training checkpoint atomically (``torch.save`` to a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "cascade_config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "stage": int(stage),
        "elapsed_s": float(elapsed_s),
        "train_seconds": float(train_seconds),
        "rng": _rng_states(rng),
        "validation": validation,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``: tensors and plain values only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints").is_dir() else path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an HDAR training checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def _prune_checkpoints(folder: Path, keep: int) -> None:
    files = sorted(folder.glob("step-*.pt"))
    for old in files[: max(0, len(files) - max(1, keep))]:
        try:
            old.unlink()
        except OSError:  # pragma: no cover
            pass


# ------------------------------------------------------------------------------------------- the log


class CsvLog:
    """Append-only CSV training log; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, *, keep_through_step: int | None = None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if keep_through_step is not None and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= keep_through_step]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k, "") for k in LOG_COLUMNS})

    def write(self, row: dict[str, Any]) -> None:
        def fmt(v: Any) -> Any:
            if isinstance(v, float):
                return "" if not math.isfinite(v) else f"{v:.6g}"
            return "" if v is None else v

        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=LOG_COLUMNS).writerow({k: fmt(row.get(k)) for k in LOG_COLUMNS})


def read_log(path: PathLike) -> list[dict[str, str]]:
    """The rows of a training log."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar (or nothing)."""

    def __init__(self, enabled: bool, total: int, done: int, title: str = "HDAR") -> None:
        self.enabled = enabled
        self.progress = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("", total=total, completed=done, info="")

    def update(self, step: int, stage: int, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=f"stage {stage}", info=info)

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ------------------------------------------------------------------------------------------- training


def _check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    saved = {**LEGACY_SETTINGS, **saved}
    new = config.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and saved.get(k) != new[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ValueError(f"cannot resume with different settings ({details}); only "
                         f"{', '.join(sorted(RESUMABLE_CHANGES))} may change")


def _make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr)


def train(
    train_data: PairDataset,
    out_dir: PathLike,
    config: TrainConfig | None = None,
    *,
    val_data: PairDataset | None = None,
    resume: PathLike | bool | None = None,
    device: str | torch.device = "auto",
    threads: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    data_description: dict[str, Any] | None = None,
) -> TrainResult:
    """Train an HDAR cascade stage by stage.

    Parameters
    ----------
    train_data : PairDataset
        At least two subjects; random ordered pairs are drawn from it.
    out_dir : path
        Receives ``train_log.csv``, ``train_config.json`` and ``checkpoints/``.
    config : TrainConfig, optional
    val_data : PairDataset, optional
        Held-out subjects; ``config.val_pairs`` fixed pairs of them are evaluated every
        ``config.val_every`` steps, at the end of each stage and at the end.
    resume : path or True, optional
        A checkpoint file, a run folder (its ``checkpoints/last.pt``), or True for ``out_dir``'s.
    device : "auto", "cpu", "cuda[:N]"
    threads : int, optional
        CPU threads for torch.
    progress : bool
        Show a rich progress bar.
    max_steps : int, optional
        Stop (with a checkpoint) after this global step, e.g. to split a long run into sessions.
    data_description : dict, optional
        Written into ``train_config.json`` (and, by :func:`export`, the model card).

    Returns
    -------
    TrainResult
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    dev = resolve_device(device)
    configure_threads(threads)
    if len(train_data) < 2:
        raise ValueError("training needs at least two subjects")

    ckpt = None
    if resume:
        ckpt = load_checkpoint(out if resume is True else resume)
        _check_resume_config(ckpt["train_config"], config)
    seed_everything(config.seed)
    model = build_cascade(config.width, config.levels, seed=config.seed,
                          **{k: v for k, v in config.cascade_settings().items() if k not in ("width", "levels")})
    rng = np.random.default_rng(config.seed)
    step, elapsed, train_seconds = 0, 0.0, 0.0
    validation: list[dict[str, Any]] = []
    stage = 0
    optimizer: torch.optim.Optimizer | None = None
    opt_state = scaler_state = None
    if ckpt is not None:
        if CascadeConfig.from_dict(ckpt["cascade_config"]).to_dict() != model.config.to_dict():
            raise ValueError(f"{ckpt['path']}: the checkpoint's cascade settings differ from this run's")
        model.load_state_dict(ckpt["model"])
        step, elapsed, train_seconds = int(ckpt["step"]), float(ckpt["elapsed_s"]), float(ckpt["train_seconds"])
        validation = list(ckpt.get("validation") or [])
        _restore_rng(ckpt["rng"], rng)
        if step < config.total_steps and config.stage_of(step + 1) == int(ckpt["stage"]):
            opt_state, scaler_state = ckpt["optimizer"], ckpt["scaler"]
    model.to(dev).train()
    dtype = amp_dtype(config, dev)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    (out / "train_config.json").write_text(json.dumps({
        "training": config.to_dict(), "cascade": model.config.to_dict(), "device": str(dev),
        "amp": str(dtype) if dtype else "off", "train_subjects": train_data.names,
        "val_subjects": val_data.names if val_data is not None else [], "grid_shape": list(train_data.shape),
        "data": data_description or {}, "command": " ".join(sys.argv)}, indent=2, default=str) + "\n")
    log = CsvLog(out / "train_log.csv", keep_through_step=step if ckpt is not None else None)
    val_pairs = val_data.validation_pairs(config.val_pairs, seed=config.seed) if val_data is not None and len(val_data) > 1 else []
    if val_data is not None and not val_pairs:
        warnings.warn("validation needs at least two held-out subjects; not validating", stacklevel=2)

    lowres = LowResCache(train_data)
    stop_at = config.total_steps if max_steps is None else min(config.total_steps, int(max_steps))
    bar = _Progress(progress, config.total_steps, step, "VoxelMorph" if config.network == "voxelmorph" else "HDAR")
    last_ckpt: Path | None = Path(ckpt["path"]) if ckpt is not None else None
    start_wall = time.perf_counter() - elapsed
    try:
        while step < stop_at:
            next_stage = config.stage_of(step + 1)
            if next_stage != stage:
                stage = next_stage
                optimizer = _make_optimizer(set_stage(model, stage), config)
                if opt_state is not None:
                    optimizer.load_state_dict(opt_state)
                    if scaler is not None and scaler_state is not None:
                        scaler.load_state_dict(scaler_state)
                    opt_state = scaler_state = None
                frozen = ", ".join(f"S{k}" for k in range(1, stage))
                bar.print(f"stage {stage}: training S{stage}" + (f" ({frozen} frozen)" if frozen else "")
                          + f", steps {config.stage_end(stage - 1) + 1}-{config.stage_end(stage)}")
            assert optimizer is not None
            # S1 at its own resolution reads both images from the low-resolution cache, where the intensity
            # change costs a hundredth of the full-resolution one
            s1_cached = stage == 1 and config.loss_resolution == "level"
            pair = train_data.sample(rng, augment=config.augment, full_resolution_intensity=not s1_cached)
            t0 = time.perf_counter()
            loss, terms = pair_loss(model, pair, stage, config, dev, rng, dtype, lowres)
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            train_seconds += dt
            step += 1
            row: dict[str, Any] = {"step": step, "stage": stage, "stage_step": step - config.stage_end(stage - 1),
                                   **terms, "lr": optimizer.param_groups[0]["lr"], "step_seconds": dt}
            stage_done = step == config.stage_end(stage)
            if val_pairs and (step % config.val_every == 0 or stage_done or step == stop_at):
                scores = validate(model, val_data, val_pairs, stage=stage, mode=config.train_mode, device=dev,  # type: ignore[arg-type]
                                  window=config.ncc_window)
                row.update(scores)
                validation.append({"step": step, "stage": stage, **scores})
                bar.print(f"step {step} (stage {stage}): val Dice {scores['val_dice']:.4f}, "
                          f"val NCC {scores['val_ncc']:.4f}, folded {scores['val_folded_percent']:.3f} %")
            elapsed = time.perf_counter() - start_wall
            row["elapsed_s"] = elapsed
            log.write(row)
            if step % config.checkpoint_every == 0 or stage_done or step == stop_at:
                name = f"step-{step:07d}.pt"
                save_checkpoint(ckpt_dir / name, model=model, config=config, optimizer=optimizer, scaler=scaler,
                                step=step, stage=stage, elapsed_s=elapsed, train_seconds=train_seconds, rng=rng,
                                validation=validation)
                tmp = ckpt_dir / "last.pt.tmp"
                tmp.unlink(missing_ok=True)
                try:
                    os.link(ckpt_dir / name, tmp)
                except OSError:
                    import shutil

                    shutil.copyfile(ckpt_dir / name, tmp)
                os.replace(tmp, ckpt_dir / "last.pt")
                _prune_checkpoints(ckpt_dir, config.keep_checkpoints)
                last_ckpt = ckpt_dir / "last.pt"
            info = f"loss {terms['loss']:.4f}" + (f" | val Dice {validation[-1]['val_dice']:.3f}" if validation else "")
            bar.update(step, stage, info)
    finally:
        bar.stop()
    model.eval()
    return TrainResult(model, config, out, out / "train_log.csv", last_ckpt, step, elapsed, train_seconds, str(dev),
                       validation, step >= config.total_steps)


# ------------------------------------------------------------------------------------------- export


def build_model_card(result: TrainResult, *, name: str, command: str | None = None,
                     data_description: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model-card fields of a finished run (see :mod:`hdar_pipeline.hdar.weights`)."""
    from hdar_pipeline.core.provenance import git_commit, hardware_description, library_versions

    levels = finished_levels(result)
    final = result.final_validation or {}
    finite = [v for v in result.validation if v.get("stage") == levels and math.isfinite(v.get("val_dice", float("nan")))]
    best = max(finite, key=lambda v: v["val_dice"]) if finite else None
    return {
        "name": name,
        "data": data_description or {},
        "command": command if command is not None else " ".join(sys.argv),
        "seed": result.config.seed,
        "commit": git_commit(),
        "hardware": hardware_description(torch.device(result.device)),
        "training_time_s": round(result.elapsed_s, 1),
        "train_step_seconds_total": round(result.train_seconds, 1),
        "steps": result.step,
        "completed": result.completed,
        "levels_exported": levels,
        "validation": {"final": final, "best": best, "history": result.validation},
        "config": {"training": result.config.to_dict()},
        "versions": library_versions(),
    }


def finished_levels(result: TrainResult) -> int:
    """Levels whose training stage is complete (``config.levels`` for a finished run)."""
    if result.completed:
        return result.config.levels
    return sum(1 for stage in range(1, result.config.levels + 1) if result.config.stage_end(stage) <= result.step)


def export(result: TrainResult, name: str, directory: PathLike | None = None, *, command: str | None = None,
           data_description: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``<directory>/<name>.pt`` and its model card from a training result (default directory: the
    run's ``out_dir``). Copy both into ``hdar_pipeline/hdar/weights/`` to ship them.

    A run stopped early (``max_steps``) exports only the levels whose stage finished, as a cascade with
    that many levels (a half-trained or untrained deeper level would only damage the field); the card's
    ``levels_exported`` and ``completed`` say so. Stopping inside stage 1 is an error."""
    from hdar_pipeline.hdar.cascade import CascadeConfig, HDARCascade
    from hdar_pipeline.hdar.weights import save_weights

    directory = Path(directory) if directory is not None else result.out_dir
    levels = finished_levels(result)
    if levels < 1:
        raise ValueError(f"nothing to export: stage 1 ends at step {result.config.stage_end(1)}, "
                         f"training stopped at step {result.step}")
    model = result.model
    if levels < model.config.levels:
        truncated = HDARCascade(CascadeConfig.from_dict({**model.config.to_dict(), "levels": levels}))
        truncated.load_state_dict({k: v for k, v in model.state_dict().items()
                                   if not k.startswith("nets.") or int(k.split(".")[1]) < levels})
        model = truncated.eval()
    card = build_model_card(result, name=name, command=command, data_description=data_description)
    return save_weights(model, model.config, card, directory / f"{name}.pt")

"""Difficulty-aware patch selection, sliding-window patch grids and seamless blending of patch fields.

Coordinates
-----------
A :class:`Patch` is a box ``[start, start + size)`` in **full-resolution voxel indices** of the fixed
grid (array axes ``i, j, k``). ``start`` may be negative, and a box may run past the far edge, only when
the patch is larger than the volume along that axis (the part outside is zero-padded by
:func:`~hdar_pipeline.hdar.layers.crop_patch`).

Selection (the paper's difficulty-aware step)
---------------------------------------------
1. average the attention map over channels;
2. score every candidate window (``window`` attention voxels, moved by ``stride``) by its mean
   attention (``avg_pool3d``);
3. map each window to a full-resolution patch of the requested size centred on the window's centre
   (attention voxel ``a`` covers full-resolution ``[offset + a * s, offset + (a + 1) * s)``, ``s`` the
   scale factor per axis) and shift it inside the volume;
4. 3-D non-maximum suppression on those boxes (a box is dropped when its IoU with a better-scoring
   kept box exceeds ``iou_threshold``, 0.5), ranked by score (ties: lower candidate index first);
5. keep the top ``K`` (8).

``ranking="random"`` (the control of the ablation study) keeps steps 1-3 and the mask rule but ranks the
candidates by a random permutation instead of their scores before the same greedy NMS: each pick is then
drawn uniformly among the candidate windows that no earlier pick suppresses, so the patches obey the
same overlap rule and only the ranking differs.

NMS runs on the mapped, clamped full-resolution boxes, i.e. on the patches that will actually be
processed; with a uniform scale this is the same as NMS in attention coordinates except where clamping
at the volume border makes two boxes overlap more. Candidates from several maps (S3 picks its
patches inside each S2 patch) are pooled before NMS, so K is a total.

Blending
--------
Every patch field is multiplied by a separable weight that is 1 in the patch core and falls to ~0
along a raised-cosine ramp of ``taper`` voxels at each face that lies inside the volume (faces on the
volume border are not tapered). With ``W`` the per-voxel sum of weights and ``A`` the weighted sum of
patch fields, the blended field is ``(A + max(0, 1 - W) * base) / max(W, 1)``: a weighted average
where patches cover the voxel with total weight >= 1, fading continuously into ``base`` (the coarser
field, or a zero residual) where they do not. Every term is continuous in space, so the result has no
seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hdar_pipeline.hdar.layers import add_patch_, as_triple

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class Patch:
    """A box of the full-resolution fixed grid, with the difficulty score that selected it.

    Attributes
    ----------
    start, size : tuple of 3 int
        Box ``[start, start + size)`` in voxels.
    score : float
        Mean attention of the window that proposed it (``nan`` for sliding-window patches).
    parent : int
        Index of the coarser-level patch it was chosen in (``-1``: chosen on the whole volume).
    """

    start: Shape3
    size: Shape3
    score: float = float("nan")
    parent: int = -1

    @property
    def stop(self) -> Shape3:
        return tuple(s + n for s, n in zip(self.start, self.size))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Slices of the part inside a volume (negative starts clipped to 0)."""
        return tuple(slice(max(0, s), e) for s, e in zip(self.start, self.stop))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"start": list(self.start), "size": list(self.size), "score": self.score, "parent": self.parent}


# ------------------------------------------------------------------------------------ geometry


def clamp_start(start: Sequence[float], size: Sequence[int], shape: Sequence[int]) -> Shape3:
    """Shift a box inside ``[0, shape)``; a box larger than the volume is centred on it."""
    out = []
    for s, m, n in zip(start, size, shape):
        s = int(round(s))
        out.append(-((m - n) // 2) if m >= n else min(max(s, 0), n - m))
    return tuple(out)  # type: ignore[return-value]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box ``(6,)`` = ``(lo_x, lo_y, lo_z, hi_x, hi_y, hi_z)`` with ``boxes`` ``(N, 6)``."""
    lo = np.maximum(box[:3], boxes[:, :3])
    hi = np.minimum(box[3:], boxes[:, 3:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    vol_a = np.prod(box[3:] - box[:3])
    vol_b = np.prod(boxes[:, 3:] - boxes[:, :3], axis=1)
    return inter / (vol_a + vol_b - inter)


def nms_3d(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5,
           max_keep: int | None = None) -> np.ndarray:
    """Greedy 3-D non-maximum suppression.

    Parameters
    ----------
    boxes : ndarray ``(N, 6)``
        ``(lo, hi)`` corners, any consistent units.
    scores : ndarray ``(N,)``
        Higher is better.
    iou_threshold : float
        A box whose IoU with an already kept box is **greater** than this is suppressed.
    max_keep : int, optional
        Stop after this many.

    Returns
    -------
    ndarray of int: indices of kept boxes, best first (ties broken by lower index).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    for rank, idx in enumerate(order):
        if suppressed[rank]:
            continue
        keep.append(int(idx))
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[rank + 1:]
        if rest.size:
            suppressed[rank + 1:] |= box_iou(boxes[idx], boxes[rest]) > iou_threshold
    return np.asarray(keep, dtype=np.int64)


# ------------------------------------------------------------------------------------ selection


def _mean_map(attention: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Channel mean as ``(1, 1, x, y, z)`` float tensor from ``(x,y,z)``, ``(C,x,y,z)`` or ``(1,C,x,y,z)``."""
    att = torch.as_tensor(attention).detach().float()
    if att.dim() == 3:
        att = att[None]
    if att.dim() == 4:
        att = att[None]
    if att.dim() != 5 or att.shape[0] != 1:
        raise ValueError(f"attention must be (x,y,z), (C,x,y,z) or (1,C,x,y,z); got {tuple(att.shape)}")
    return att.mean(dim=1, keepdim=True)


class _MaskBoxSum:
    """O(1) voxel counts of a boolean mask inside boxes (3-D summed-area table)."""

    def __init__(self, mask: np.ndarray) -> None:
        m = np.asarray(mask, dtype=bool)
        self.shape = m.shape
        table = np.zeros(tuple(n + 1 for n in m.shape), dtype=np.int64)
        table[1:, 1:, 1:] = m.cumsum(0).cumsum(1).cumsum(2)
        self.table = table

    def count(self, start: Sequence[int], stop: Sequence[int]) -> int:
        lo = [min(max(0, s), n) for s, n in zip(start, self.shape)]
        hi = [min(max(0, e), n) for e, n in zip(stop, self.shape)]
        t = self.table
        x0, y0, z0 = lo
        x1, y1, z1 = hi
        return int(t[x1, y1, z1] - t[x0, y1, z1] - t[x1, y0, z1] - t[x1, y1, z0]
                   + t[x0, y0, z1] + t[x0, y1, z0] + t[x1, y0, z0] - t[x0, y0, z0])


def candidate_patches(
    attention: torch.Tensor | np.ndarray,
    *,
    patch_size: int | Sequence[int],
    full_shape: Sequence[int],
    region_start: Sequence[int] = (0, 0, 0),
    region_size: Sequence[int] | None = None,
    window: int | Sequence[int] | None = None,
    stride: int | Sequence[int] = 1,
    parent: int = -1,
) -> list[Patch]:
    """Score candidate windows of one attention map and map them to full-resolution patches.

    Parameters
    ----------
    attention : ``(x, y, z)``, ``(C, x, y, z)`` or ``(1, C, x, y, z)``
        Attention map covering the full-resolution box ``[region_start, region_start + region_size)``.
    patch_size : int or 3 ints
        Size of the full-resolution patches to propose (voxels).
    full_shape : 3 ints
        Shape of the full-resolution volume (patches are shifted inside it).
    region_start, region_size : 3 ints
        Where the map lies in full resolution (default: the whole volume).
    window : int or 3 ints, optional
        Candidate window in attention voxels; default ``round(patch_size / s)`` with
        ``s = region_size / map shape``, clipped to the map.
    stride : int or 3 ints
        Step between candidate windows in attention voxels.
    parent : int
        Recorded in each :class:`Patch`.

    Returns
    -------
    list of Patch, in the raster order of the windows, each with its mean-attention score.
    """
    att = _mean_map(attention)
    amap = att.shape[2:]
    full_shape = tuple(int(n) for n in full_shape)
    region_size = tuple(full_shape if region_size is None else (int(n) for n in region_size))
    patch = tuple(int(p) for p in as_triple(patch_size))
    scale = [r / a for r, a in zip(region_size, amap)]
    if window is None:
        win = [max(1, int(round(p / s))) for p, s in zip(patch, scale)]
    else:
        win = [int(w) for w in as_triple(window)]
    win = [min(w, a) for w, a in zip(win, amap)]
    step = [max(1, int(s)) for s in as_triple(stride)]
    scores = F.avg_pool3d(att, kernel_size=win, stride=step)[0, 0]
    out: list[Patch] = []
    for idx in np.ndindex(*scores.shape):
        offset = [i * s for i, s in zip(idx, step)]
        centre = [r0 + (o + w / 2.0) * s for r0, o, w, s in zip(region_start, offset, win, scale)]
        start = clamp_start([c - p / 2.0 for c, p in zip(centre, patch)], patch, full_shape)
        out.append(Patch(start, patch, float(scores[idx]), parent))
    return out


def select_patches(
    candidates: Sequence[Patch],
    *,
    top_k: int = 8,
    iou_threshold: float = 0.5,
    mask: np.ndarray | torch.Tensor | None = None,
    min_mask_fraction: float = 0.0,
    ranking: Literal["score", "random"] = "score",
    rng: np.random.Generator | int | None = None,
) -> list[Patch]:
    """Rank candidates by score, suppress overlaps (3-D NMS) and keep the top ``top_k``.

    Parameters
    ----------
    candidates : list of Patch
        From :func:`candidate_patches` (possibly pooled from several maps).
    top_k : int
        Number of patches to keep (fewer when fewer survive NMS).
    iou_threshold : float
        NMS overlap threshold (IoU; 0.5 in the paper).
    mask : bool array on the full-resolution grid, optional
        When given, candidates whose fraction of mask voxels is not above ``min_mask_fraction`` are
        dropped first (so an untrained or confused attention map never spends patches on background).
    ranking : "score" or "random"
        ``"score"``: by mean attention (the paper). ``"random"``: by a random permutation drawn from
        ``rng`` (same candidates, mask rule and NMS; the patches keep their attention scores).
    rng : numpy Generator or int seed, optional
        Source of the permutation for ``ranking="random"`` (default: a fresh unseeded generator).

    Returns
    -------
    list of Patch, best first (``"random"``: in the order drawn).
    """
    if ranking not in ("score", "random"):
        raise ValueError(f"ranking must be 'score' or 'random', got {ranking!r}")
    cands = list(candidates)
    if mask is not None and cands:
        counter = _MaskBoxSum(torch.as_tensor(mask).cpu().numpy() if isinstance(mask, torch.Tensor) else mask)
        cands = [c for c in cands
                 if counter.count(c.start, c.stop) / float(np.prod(c.size)) > min_mask_fraction]
    if not cands:
        return []
    boxes = np.array([[*c.start, *c.stop] for c in cands], dtype=np.float64)
    if ranking == "random":
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        scores = generator.permutation(len(cands)).astype(np.float64)  # distinct: no ties
    else:
        scores = np.array([c.score for c in cands], dtype=np.float64)
    keep = nms_3d(boxes, scores, iou_threshold, max_keep=top_k)
    return [cands[i] for i in keep]


def sliding_window_patches(
    full_shape: Sequence[int],
    patch_size: int | Sequence[int],
    stride: int | Sequence[int],
    *,
    mask: np.ndarray | torch.Tensor | None = None,
) -> list[Patch]:
    """A regular grid of patches covering the volume; with a mask, only those touching it.

    Along each axis, starts are ``0, stride, 2 * stride, ...`` plus a last start flush with the far
    edge, so every voxel (hence every mask voxel) lies in at least one patch.
    """
    full_shape = tuple(int(n) for n in full_shape)
    patch = tuple(int(p) for p in as_triple(patch_size))
    step = tuple(max(1, int(s)) for s in as_triple(stride))
    starts_axes = []
    for n, p, s in zip(full_shape, patch, step):
        if p >= n:
            starts_axes.append([-((p - n) // 2)])
            continue
        starts = list(range(0, n - p + 1, s))
        if starts[-1] != n - p:
            starts.append(n - p)
        starts_axes.append(starts)
    counter = None
    if mask is not None:
        counter = _MaskBoxSum(torch.as_tensor(mask).cpu().numpy() if isinstance(mask, torch.Tensor) else mask)
    out = []
    for sx in starts_axes[0]:
        for sy in starts_axes[1]:
            for sz in starts_axes[2]:
                p = Patch((sx, sy, sz), patch)
                if counter is None or counter.count(p.start, p.stop) > 0:
                    out.append(p)
    return out


# ------------------------------------------------------------------------------------ blending


def ramp_profile(size: int, taper: int, *, taper_low: bool = True, taper_high: bool = True) -> np.ndarray:
    """1-D weights: 1 in the core, raised-cosine ramps of ``taper`` voxels at the tapered ends.

    The ramp value at ramp voxel ``t`` (0 at the edge) is ``(1 - cos(pi * (t + 0.5) / taper)) / 2``:
    strictly positive, symmetric, and two ramps overlapping exactly sum to 1.
    """
    w = np.ones(size, dtype=np.float64)
    taper = int(min(max(taper, 0), size // 2))
    if taper > 0:
        t = np.arange(taper, dtype=np.float64)
        ramp = 0.5 - 0.5 * np.cos(math.pi * (t + 0.5) / taper)
        if taper_low:
            w[:taper] = ramp
        if taper_high:
            w[size - taper:] = ramp[::-1]
    return w


def blend_weights(patch: Patch, full_shape: Sequence[int], taper: int | Sequence[int], *,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Separable weight ``(1, 1, *patch.size)`` for a patch; faces on the volume border are not tapered."""
    tapers = as_triple(taper)
    profiles = []
    for s, m, n, t in zip(patch.start, patch.size, full_shape, tapers):
        profiles.append(ramp_profile(m, int(t), taper_low=s > 0, taper_high=s + m < n))
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return torch.as_tensor(w, dtype=dtype, device=device)[None, None]


class PatchBlender:
    """Accumulate patch fields into one full-resolution field without seams.

    Parameters
    ----------
    full_shape : 3 ints
        Shape of the full-resolution volume.
    channels : int
        Channels of the fields (3 for displacement / velocity fields).
    taper : int or 3 ints
        Ramp length in voxels at each inner patch face (see :func:`ramp_profile`).
    batch : int
        Batch size of the accumulated field.

    Use :meth:`add` for each patch and :meth:`result` once. Gradients flow to the patch fields.
    """

    def __init__(self, full_shape: Sequence[int], *, channels: int = 3, taper: int | Sequence[int] = 0,
                 batch: int = 1, device=None, dtype=torch.float32) -> None:
        self.full_shape = tuple(int(n) for n in full_shape)
        self.taper = taper
        self.acc = torch.zeros((batch, channels, *self.full_shape), device=device, dtype=dtype)
        self.weight = torch.zeros((1, 1, *self.full_shape), device=device, dtype=dtype)
        self.count = 0

    def add(self, field: torch.Tensor, patch: Patch) -> None:
        """Add ``field`` ``(B, C, *patch.size)`` (full-resolution units) for ``patch``."""
        if tuple(field.shape[2:]) != tuple(patch.size):
            raise ValueError(f"field {tuple(field.shape)} does not match patch size {patch.size}")
        w = blend_weights(patch, self.full_shape, self.taper, device=field.device, dtype=field.dtype)
        add_patch_(self.acc, field * w, patch.start)
        add_patch_(self.weight, w, patch.start)
        self.count += 1

    def result(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """``(A + max(0, 1 - W) * base) / max(W, 1)``; ``base`` defaults to zero (a residual)."""
        out = self.acc
        if base is not None:
            out = out + base * torch.clamp(1.0 - self.weight, min=0.0)
        return out / torch.clamp(self.weight, min=1.0)

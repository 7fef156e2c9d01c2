"""Full-resolution local NCC for a correction on a coarser grid, linearised around a warp.

The last refinement level (:func:`hdar_pipeline.hdar.instance.refine_flow`, ``similarity="full"``)
optimises a correction ``c`` on a grid of ``b x b x b`` blocks (``b = 2``: half resolution) against the
local NCC of the **full-resolution** images: the fine image detail that the half-resolution loss cannot
see, for the price of a half-resolution optimisation. Two things make that cheap:

* **Block-aligned windows.** The NCC window of a block is the ``window^3`` blocks around it (``b * window``
  voxels a side); its statistics are box sums of per-block sums of ``j``, ``j^2`` and ``i j``, so they
  live on the block grid. Every voxel of a block shares its window, and the loss is the mean over voxels
  of the local squared correlation, as in :func:`~hdar_pipeline.hdar.losses.local_ncc_loss`.
* **Linearisation.** Around the current warp ``W = M o (id + u)`` the moving image moved by a further
  displacement ``d`` (full-resolution voxels, constant over a block) is ``W + G . d`` to first order,
  ``G`` the spatial gradient of ``W``. The block sums of ``j``, ``j^2`` and ``i j`` are then polynomials
  in ``d`` whose coefficients (block sums of ``W``, ``W^2``, ``i W``, ``G_a``, ``W G_a``, ``i G_a``,
  ``G_a G_b``: 18 channels; for blocks of one voxel, ``W`` and ``G`` themselves) are computed once per
  linearisation at full resolution; every step after that
  costs a half-resolution NCC. The caller re-linearises (re-warps) every few steps, so ``d`` stays below
  a voxel or so.

Shapes: full-resolution volumes ``(1, 1, X, Y, Z)`` with ``X, Y, Z`` multiples of ``b``; block-grid
tensors ``(1, C, X / b, Y / b, Z / b)``.
"""

from __future__ import annotations

import torch

from hdar_pipeline.hdar.losses import box_sum, ncc_from_sums, ncc_sum_gradients

__all__ = ["LinearisedBlockNCC", "block_product_sums", "block_sums", "image_gradient"]

# the six products G_a G_b (a <= b) in the order of the 'gg' channels
_PAIRS = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]


def block_sums(x: torch.Tensor, block: int, dims: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    """Sum of every ``block^3`` block of ``(B, C, X, Y, Z)`` (sizes multiples of ``block``); with ``dims``, of
    blocks along those dimensions only."""
    if block == 1:
        return x
    for dim in dims:
        # strided views, one axis at a time (several times faster than avg_pool3d on the CPU)
        index = [slice(None)] * 5
        parts = []
        for offset in range(block):
            index[dim] = slice(offset, None, block)
            parts.append(x[tuple(index)])
        x = parts[0] + parts[1] if block == 2 else torch.stack(parts).sum(0)
    return x


def block_product_sums(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """``block_sums(a * b, block)`` without the full-resolution product: the products of the ``block``
    strided views along the first spatial axis are summed as they are made (2.5x faster on the CPU for
    a 1 mm brain's box). ``a``, ``b`` ``(B, C, X, Y, Z)`` broadcastable, sizes multiples of ``block``."""
    if block == 1:
        return a * b
    index = [slice(None)] * 5
    index[2] = slice(0, None, block)
    out = torch.mul(a[tuple(index)], b[tuple(index)])
    for offset in range(1, block):
        index[2] = slice(offset, None, block)
        out.addcmul_(a[tuple(index)], b[tuple(index)])
    return block_sums(out, block, dims=(3, 4))


def image_gradient(x: torch.Tensor) -> torch.Tensor:
    """Spatial gradient ``(B, 3, X, Y, Z)`` of ``(B, 1, X, Y, Z)``: central differences inside, one-sided
    at the faces (as :func:`torch.gradient`), in intensity per voxel; channel ``a`` along array axis ``a``."""
    out = torch.empty((x.shape[0], 3, *x.shape[2:]), dtype=x.dtype, device=x.device)
    for a in range(3):
        dim, n = 2 + a, x.shape[2 + a]
        o = out[:, a:a + 1]
        if n < 2:
            o.zero_()
            continue
        if n > 2:
            torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=o.narrow(dim, 1, n - 2))
            o.narrow(dim, 1, n - 2).mul_(0.5)
        torch.sub(x.narrow(dim, 1, 1), x.narrow(dim, 0, 1), out=o.narrow(dim, 0, 1))
        torch.sub(x.narrow(dim, n - 1, 1), x.narrow(dim, n - 2, 1), out=o.narrow(dim, n - 1, 1))
    return out


class LinearisedBlockNCC:
    """The loss ``-mean(local NCC)`` at full resolution of a fixed image and a linearised warp.

    Parameters
    ----------
    fixed : Tensor ``(1, 1, X, Y, Z)``
        Full-resolution intensities (treated as constant), sizes multiples of ``block``.
    block : int
        Block edge in voxels (the correction grid's voxel: 2 for half resolution).
    window : int
        Window edge in blocks (``block * window`` voxels).
    eps : float
        Added to the variance product, as in :func:`~hdar_pipeline.hdar.losses.local_ncc`.
    mean_over : int, optional
        Number of blocks the mean runs over (default: this volume's); a crop of a larger volume that
        holds every block where the correlation is non-zero gives the larger volume's loss with it.

    Use :meth:`linearise` with the current warped moving image, then :meth:`loss` of a displacement
    ``d`` ``(1, 3, X / b, Y / b, Z / b)`` in full-resolution voxels relative to that warp.
    """

    def __init__(self, fixed: torch.Tensor, block: int, window: int = 5, eps: float = 1e-8,
                 mean_over: int | None = None) -> None:
        if fixed.dim() != 5 or fixed.shape[:2] != (1, 1):
            raise ValueError(f"fixed must be (1, 1, X, Y, Z), got {tuple(fixed.shape)}")
        if any(int(n) % block for n in fixed.shape[2:]):
            raise ValueError(f"the volume {tuple(fixed.shape[2:])} is not a whole number of {block}^3 blocks")
        with torch.no_grad():
            self.block, self.window, self.eps = int(block), int(window), float(eps)
            self.i = fixed.detach() - fixed.detach().mean()
            grid = tuple(int(n) // self.block for n in fixed.shape[2:])
            self.inv_n = 1.0 / (box_sum(torch.ones((1, 1, *grid), dtype=fixed.dtype, device=fixed.device), window)
                                * float(self.block ** 3))
            stats = box_sum(block_sums(torch.cat([self.i, self.i * self.i], dim=1), self.block), window) * self.inv_n
            self.mi = stats[:, :1]
            self.var_i = torch.clamp(stats[:, 1:] - self.mi * self.mi, min=0.0)
            self.weight = 1.0 / float(self.mi.numel() if mean_over is None else mean_over)
        self.sums: dict[str, torch.Tensor] | None = None

    def linearise(self, warped: torch.Tensor) -> None:
        """Take ``warped`` ``(1, 1, X, Y, Z)`` (the moving image under the current field) as the point
        ``d = 0`` of the linear model; computes the 18 block-sum channels."""
        if warped.shape != self.i.shape:
            raise ValueError(f"shapes differ: {tuple(self.i.shape)} vs {tuple(warped.shape)}")
        with torch.no_grad():
            w = warped.detach() - warped.detach().mean()
            g = image_gradient(w)
            if self.block == 1:
                # a block of one voxel: ``W + G . d`` per voxel is cheaper than the 18 sums' polynomials
                self.sums = {"w": w, "g": g}
                return
            s = torch.empty((1, 18, *self.mi.shape[2:]), dtype=w.dtype, device=w.device)
            # one product at a time, straight into its block sums (no 18-channel full-resolution tensor)
            b = self.block
            s[:, 0:1] = block_sums(w, b)
            s[:, 1:2] = block_product_sums(w, w, b)
            s[:, 2:3] = block_product_sums(self.i, w, b)
            s[:, 3:6] = block_sums(g, b)
            s[:, 6:9] = block_product_sums(w, g, b)
            s[:, 9:12] = block_product_sums(self.i, g, b)
            for k, (p, q) in enumerate(_PAIRS):
                s[:, 12 + k:13 + k] = block_product_sums(g[:, p:p + 1], g[:, q:q + 1], b)
            self.sums = {"j": s[:, 0:1], "jj": s[:, 1:2], "ij": s[:, 2:3], "g": s[:, 3:6], "jg": s[:, 6:9],
                         "ig": s[:, 9:12], "gg": s[:, 12:18]}

    def loss(self, d: torch.Tensor) -> torch.Tensor:
        """``-mean`` over voxels of the local squared NCC with the moving image ``W + G . d``.

        ``d`` ``(1, 3, X / b, Y / b, Z / b)``: displacement in full-resolution voxels, constant over each
        block, relative to the last :meth:`linearise`. Differentiable with respect to ``d``.
        """
        if self.sums is None:
            raise RuntimeError("call linearise() before loss()")
        return _BlockNCCLoss.apply(d, self)

    def moving_sums(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block ``sum j``, ``sum j^2``, ``sum i j`` ``(1, 3, ...)`` of the linearised moving image, and
        ``(sum G G^T) d`` per block ``(1, 3, ...)``, which the gradient reuses (blocks of one voxel: the
        linearised moving image ``j`` itself, ``(1, 1, ...)``). Values only (written in
        place, no autograd graph): :meth:`loss` is the differentiable path."""
        s = self.sums
        assert s is not None
        if self.block == 1:
            j = s["w"] + (d * s["g"]).sum(1, keepdim=True)
            return torch.cat([j, j * j, self.i * j], dim=1), j
        out = torch.empty((1, 3, *d.shape[2:]), dtype=d.dtype, device=d.device)
        torch.sum(d * s["g"], 1, keepdim=True, out=out[:, 0:1])
        out[:, 0:1] += s["j"]
        gd = _symmetric_times(s["gg"], d)  # (sum G G^T) d per block
        torch.sum((2.0 * s["jg"] + gd) * d, 1, keepdim=True, out=out[:, 1:2])
        out[:, 1:2] += s["jj"]
        torch.sum(d * s["ig"], 1, keepdim=True, out=out[:, 2:3])
        out[:, 2:3] += s["ij"]
        return out, gd


def _symmetric_times(gg: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``A d`` per block for the symmetric 3 x 3 matrices ``A`` whose six entries ``gg`` ``(1, 6, ...)`` holds
    in the order of ``_PAIRS``; ``d`` ``(1, 3, ...)``. (Explicit products: about half the time of an
    ``einsum`` over the full 3 x 3 stack, which it also spares materialising.)"""
    out = torch.empty_like(d)
    for a in range(3):
        entries = [gg[:, _PAIRS.index((min(a, b), max(a, b)))] for b in range(3)]
        row = out[:, a]
        torch.mul(entries[0], d[:, 0], out=row)
        row.addcmul_(entries[1], d[:, 1]).addcmul_(entries[2], d[:, 2])
    return out


class _BlockNCCLoss(torch.autograd.Function):
    """The loss of :meth:`LinearisedBlockNCC.loss` with its gradient in closed form."""

    @staticmethod
    def forward(ctx, d: torch.Tensor, ncc: LinearisedBlockNCC) -> torch.Tensor:  # type: ignore[override]
        sums, extra = ncc.moving_sums(d)  # extra: (sum G G^T) d per block; for blocks of one voxel, j itself
        cc, terms = ncc_from_sums(sums, ncc.window, ncc.inv_n, ncc.mi, ncc.var_i, ncc.eps)
        ctx.ncc = ncc
        ctx.save_for_backward(extra, *terms)
        return -(cc * ncc.weight).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        ncc: LinearisedBlockNCC = ctx.ncc
        extra, *terms = ctx.saved_tensors
        s = ncc.sums
        assert s is not None
        gs = ncc_sum_gradients(terms, -grad_out * ncc.weight, ncc.window, ncc.inv_n, ncc.mi, ncc.var_i)
        g_j, g_jj, g_ij = gs[:, :1], gs[:, 1:2], gs[:, 2:]
        if ncc.block == 1:
            # j = W + G . d per voxel: dL/dd = dL/dj G
            return (g_j + 2.0 * g_jj * extra + g_ij * ncc.i) * s["g"], None
        # d(sum j^2)/d d_a = 2 (sum W G_a + sum_b sum G_a G_b d_b)
        return g_j * s["g"] + 2.0 * g_jj * (s["jg"] + extra) + g_ij * s["ig"], None
